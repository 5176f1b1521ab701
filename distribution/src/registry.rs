//! A registry seen through `oci-client`'s blob-level calls: existence checks, monolithic blob
//! uploads from memory or a file, downloads into a file with a size bound and a sha256 check,
//! raw manifests. Credentials come from the usual docker (or podman) sources.

use std::io::{Seek, Write};

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use sha2::Digest as _;

use crate::address::OciAddress;
use crate::error::{DistError, Result};

/// A connection to one repository of one registry.
pub struct Registry {
    client: oci_client::Client,
    addr: OciAddress,
}

/// What a download found.
pub enum Downloaded {
    /// The bytes hash to the expected digest.
    Good,
    /// All bytes came, but they hash to this digest instead.
    Mismatch(String),
}

impl Registry {
    /// A client for `addr`, with the credentials docker or podman has for its host.
    pub async fn connect(addr: &OciAddress) -> Result<Self> {
        install_crypto_provider();
        let config = ClientConfig {
            protocol: if addr.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            // One PUT per blob (a chunked upload costs a PATCH more), and velo knows every size.
            use_monolithic_push: true,
            connect_timeout: Some(std::time::Duration::from_secs(15)),
            read_timeout: Some(std::time::Duration::from_secs(300)),
            user_agent: concat!("velo/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        let client = oci_client::Client::try_from(config).map_err(|e| DistError::Registry {
            url: addr.base_url(),
            op: "set up the HTTP client".into(),
            reason: chain(&e),
        })?;
        let auth = credentials(addr.registry());
        client
            .store_auth_if_needed(addr.reference.resolve_registry(), &auth)
            .await;
        Ok(Self {
            client,
            addr: addr.clone(),
        })
    }

    /// The address this connection serves.
    pub fn address(&self) -> &OciAddress {
        &self.addr
    }

    fn error(&self, op: &str, url: String, e: OciDistributionError) -> DistError {
        map_error(&self.addr, op, url, e)
    }

    /// Whether the repository has the blob.
    pub async fn blob_exists(&self, digest: &str) -> Result<bool> {
        self.client
            .blob_exists(&self.addr.reference, digest)
            .await
            .map_err(|e| self.error("check blob", self.addr.blob_url(digest), e))
    }

    /// Uploads a blob held in memory.
    pub async fn push_bytes(&self, data: Vec<u8>, digest: &str) -> Result<()> {
        self.client
            .push_blob(&self.addr.reference, data, digest)
            .await
            .map(|_| ())
            .map_err(|e| self.error("upload blob", self.addr.blob_url(digest), e))
    }

    /// Uploads a blob from a file (read from its start), streaming.
    pub async fn push_file(&self, file: std::fs::File, size: u64, digest: &str) -> Result<()> {
        let mut file = tokio::fs::File::from_std(file);
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| DistError::io("rewind", "blob staging file", e))?;
        let stream = futures_util::stream::unfold(file, |mut f| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 20];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(bytes::Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(OciDistributionError::IoError(e)), f)),
            }
        });
        self.client
            .push_blob_stream(&self.addr.reference, stream, digest, Some(size))
            .await
            .map(|_| ())
            .map_err(|e| self.error("upload blob", self.addr.blob_url(digest), e))
    }

    /// Downloads a blob of `size` bytes into `out` (from its current position), checking its
    /// sha256; more bytes than `size` is an error, never written.
    pub async fn pull_to_file(
        &self,
        digest: &str,
        size: u64,
        out: &mut std::fs::File,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Downloaded> {
        let url = self.addr.blob_url(digest);
        let desc = OciDescriptor {
            digest: digest.to_owned(),
            size: size as i64,
            ..Default::default()
        };
        let mut stream = self
            .client
            .pull_blob_stream(&self.addr.reference, &desc)
            .await
            .map_err(|e| self.error("download blob", url.clone(), e))?
            .stream;
        let mut hasher = sha2::Sha256::new();
        let mut got = 0u64;
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, &mut *out);
        while let Some(item) = stream.next().await {
            let chunk = match item {
                Ok(c) => c,
                // oci-client's own digest check ends the stream with an error once every byte
                // came; velo's check below names the problem better.
                Err(_) if got == size => break,
                Err(e) => {
                    return Err(DistError::Registry {
                        url,
                        op: "download blob".into(),
                        reason: e.to_string(),
                    });
                }
            };
            got += chunk.len() as u64;
            if got > size {
                return Err(DistError::Corrupt {
                    what: format!("blob {digest} ({url})"),
                    reason: format!("the registry sent more than its {size} bytes"),
                });
            }
            hasher.update(&chunk);
            writer
                .write_all(&chunk)
                .map_err(|e| DistError::io("write", "blob staging file", e))?;
            on_bytes(chunk.len() as u64);
        }
        writer
            .flush()
            .map_err(|e| DistError::io("write", "blob staging file", e))?;
        drop(writer);
        out.rewind()
            .map_err(|e| DistError::io("rewind", "blob staging file", e))?;
        if got < size {
            return Err(DistError::Corrupt {
                what: format!("blob {digest} ({url})"),
                reason: format!("the registry sent {got} of its {size} bytes"),
            });
        }
        let found = format!("sha256:{}", hex::encode(hasher.finalize()));
        Ok(if found == digest {
            Downloaded::Good
        } else {
            Downloaded::Mismatch(found)
        })
    }

    /// Downloads a small blob into memory, checking its size and sha256.
    pub async fn pull_bytes(
        &self,
        digest: &str,
        size: u64,
        max: u64,
        what: &str,
    ) -> Result<Vec<u8>> {
        let url = self.addr.blob_url(digest);
        if size > max {
            return Err(DistError::BadArtifact {
                url,
                reason: format!("the {what} is {size} bytes, more than velo accepts ({max})"),
            });
        }
        let mut file =
            tempfile::tempfile().map_err(|e| DistError::io("create", "temporary file", e))?;
        match self.pull_to_file(digest, size, &mut file, &|_| {}).await? {
            Downloaded::Good => {}
            Downloaded::Mismatch(found) => {
                return Err(DistError::Corrupt {
                    what: format!("the {what} (blob {digest}, {url})"),
                    reason: format!("its bytes hash to {found}"),
                });
            }
        }
        let mut buf = Vec::with_capacity(size as usize);
        std::io::Read::read_to_end(&mut file, &mut buf)
            .map_err(|e| DistError::io("read", "temporary file", e))?;
        Ok(buf)
    }

    /// Uploads a manifest under the address's tag; returns its digest.
    pub async fn push_manifest(&self, body: Vec<u8>) -> Result<String> {
        let digest = crate::artifact::sha256_digest(&body);
        let content_type = http::HeaderValue::from_static(crate::artifact::MANIFEST_MEDIA_TYPE);
        self.client
            .push_manifest_raw(&self.addr.reference, body, content_type)
            .await
            .map_err(|e| self.error("upload manifest", self.addr.manifest_url(), e))?;
        Ok(digest)
    }

    /// Downloads the manifest the address names; returns its bytes and digest.
    pub async fn pull_manifest(&self) -> Result<(Vec<u8>, String)> {
        let (body, digest) = self
            .client
            .pull_manifest_raw(
                &self.addr.reference,
                &RegistryAuth::Anonymous,
                &[crate::artifact::MANIFEST_MEDIA_TYPE],
            )
            .await
            .map_err(|e| self.error("download manifest", self.addr.manifest_url(), e))?;
        Ok((body.to_vec(), digest))
    }
}

/// rustls is built with ring (not aws-lc-rs, which doubles the compile time); it needs that
/// provider installed once per process before the first TLS client is made.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Credentials for a registry host: docker's config (`$DOCKER_CONFIG/config.json` or
/// `~/.docker/config.json`, with its `credsStore`/`credHelpers`), then podman's auth file
/// (`$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`); anonymous otherwise.
pub fn credentials(host: &str) -> RegistryAuth {
    use docker_credential::DockerCredential;
    let found = docker_credential::get_credential(host)
        .or_else(|_| docker_credential::get_podman_credential(host));
    match found {
        Ok(DockerCredential::UsernamePassword(user, password)) => {
            RegistryAuth::Basic(user, password)
        }
        Ok(DockerCredential::IdentityToken(token)) => RegistryAuth::Bearer(token),
        Err(_) => RegistryAuth::Anonymous,
    }
}

/// An error with its whole chain of causes.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

fn map_error(addr: &OciAddress, op: &str, url: String, e: OciDistributionError) -> DistError {
    let reason = chain(&e);
    let lower = reason.to_lowercase();
    let connect = matches!(&e, OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout())
        || lower.contains("connection refused")
        || lower.contains("tcp connect error")
        || lower.contains("dns error");
    let tls_mismatch = lower.contains("invalidcontenttype")
        || lower.contains("corrupt message")
        || lower.contains("invalid http version")
        || (lower.contains("tls") && lower.contains("handshake"));
    if tls_mismatch && !addr.plain_http {
        return DistError::Unreachable {
            url: addr.base_url(),
            reason,
            hint: "; a registry without TLS (a local one) needs --plain-http".into(),
        };
    }
    if connect {
        return DistError::Unreachable {
            url: addr.base_url(),
            reason,
            hint: format!(
                "; is a registry running at {}{}?",
                addr.registry(),
                if addr.plain_http {
                    ""
                } else {
                    " (and serving HTTPS: use --plain-http for plain HTTP)"
                }
            ),
        };
    }
    let unauthorized = matches!(
        &e,
        OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_)
    ) || lower.contains("unauthorized")
        || lower.contains("401");
    let reason = if lower.contains("manifest unknown") || lower.contains("name unknown") {
        format!(
            "the registry has no {} (manifest unknown)",
            addr.reference.whole()
        )
    } else if unauthorized {
        format!(
            "{reason} (velo uses the credentials of `docker login {}` — docker's config.json or its \
             credential helper — or podman's auth.json)",
            addr.registry()
        )
    } else {
        reason
    };
    DistError::Registry {
        url,
        op: op.to_owned(),
        reason,
    }
}
