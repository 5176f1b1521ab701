//! A registry through the blob-level calls of the distribution API: existence checks (`HEAD`),
//! monolithic blob uploads from memory or a file (`POST` + `PUT`), downloads into a file with a
//! size bound and a sha256 check, raw manifests. Credentials come from the usual docker (or
//! podman) sources; `oci-client` does the token dance when the registry asks for one (a 401).
//!
//! Every request is retried on its own when it fails transiently ([`crate::retry`]): a 5xx, a
//! 408 or 429 (after its `Retry-After`), a timeout, a connection broken mid-way. A download that
//! broke resumes where it stopped (`Range`); an upload that broke starts a new upload session,
//! after checking that the blob did not land anyway. What other requests fetched is kept. After
//! the last try the error names the request (the blob's digest, what it holds, the address), the
//! number of attempts and the last cause.
//!
//! The requests are velo's own (`reqwest`, the HTTP client under `oci-client`): `oci-client`
//! turns an error answer into a message and drops its headers, so its calls cannot honour a
//! `Retry-After`, nor tell a truncated body from a wrong one.

use std::io::{Seek, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::RegistryOperation;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use reqwest::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE, RETRY_AFTER,
};
use reqwest::{Method, StatusCode, Url};
use sha2::Digest as _;

use crate::address::OciAddress;
use crate::artifact::is_sha256_digest;
use crate::error::{DistError, Result};
use crate::retry::{self, Failure, RetryPolicy};

/// A connection to one repository of one registry.
pub struct Registry {
    http: reqwest::Client,
    /// Only for tokens: `oci-client` knows the registries' auth challenges.
    oci: oci_client::Client,
    creds: RegistryAuth,
    addr: OciAddress,
    /// `scheme://host[:port]/`, where requests go.
    origin: Url,
    /// What to send for pulls and for pushes, learnt from 401s.
    auth: std::sync::Mutex<[Authorization; 2]>,
    /// Whether the registry has answered anything (a connection refused later is transient).
    reached: AtomicBool,
    /// Retries made so far, all requests together.
    retries: AtomicU64,
    policy: RetryPolicy,
}

/// What a download found.
pub enum Downloaded {
    /// The bytes hash to the expected digest.
    Good,
    /// All bytes came, but they hash to this digest instead.
    Mismatch(String),
}

/// The `Authorization` a request carries.
#[derive(Debug, Clone)]
enum Authorization {
    Anonymous,
    Basic(String, String),
    Bearer(String),
}

/// Which token a request needs.
#[derive(Debug, Clone, Copy)]
enum Scope {
    Pull = 0,
    Push = 1,
}

/// How one attempt at a request failed.
enum Attempt {
    /// Retried if the failure is transient ([`retry::is_transient`]).
    Failed {
        failure: Failure,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Never retried (bytes that are not what they should be, a local error).
    Fatal(DistError),
}

impl From<DistError> for Attempt {
    fn from(e: DistError) -> Self {
        Attempt::Fatal(e)
    }
}

/// Where a blob upload's bytes come from (read again from the start by every attempt).
#[derive(Clone)]
enum Upload {
    Bytes(bytes::Bytes),
    File(Arc<std::fs::File>),
}

/// The bytes of a download so far, kept across attempts.
struct Partial<'a> {
    out: &'a mut std::fs::File,
    hasher: sha2::Sha256,
    got: u64,
    /// Bytes already reported to the progress callback (a restart does not report them twice).
    reported: u64,
}

impl Partial<'_> {
    fn restart(&mut self) -> Result<()> {
        self.out
            .set_len(0)
            .and_then(|()| self.out.rewind())
            .map_err(|e| DistError::io("truncate", "blob staging file", e))?;
        self.hasher = sha2::Sha256::new();
        self.got = 0;
        Ok(())
    }
}

/// The attempts at one request: counts them, waits between them, says when to stop.
struct Tries<'a> {
    registry: &'a Registry,
    op: String,
    url: String,
    made: u32,
    waited: Duration,
}

impl Tries<'_> {
    /// After a failed attempt: waits and returns `Ok` to try again, or the final error.
    async fn failed(&mut self, attempt: Attempt) -> Result<()> {
        self.made += 1;
        let (failure, reason, retry_after) = match attempt {
            Attempt::Fatal(e) => return Err(e),
            Attempt::Failed {
                failure,
                reason,
                retry_after,
            } => (failure, reason, retry_after),
        };
        let r = self.registry;
        let reached = r.reached.load(Ordering::Relaxed);
        let next = retry::next_delay(
            &r.policy,
            failure,
            reached,
            self.made,
            self.waited,
            retry_after,
            retry::jitter(),
        );
        let Some(delay) = next else {
            return Err(r.give_up(&self.op, &self.url, failure, reason, self.made));
        };
        tracing::warn!(
            "{}: {} failed (attempt {} of {}): {reason}; trying again in {:.1} s",
            self.url,
            self.op,
            self.made,
            r.policy.attempts,
            delay.as_secs_f64()
        );
        r.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(delay).await;
        self.waited += delay;
        Ok(())
    }
}

impl Registry {
    /// A client for `addr`, with the credentials docker or podman has for its host, retrying
    /// as the environment says ([`RetryPolicy::from_env`]).
    pub async fn connect(addr: &OciAddress) -> Result<Self> {
        let policy = RetryPolicy::from_env().map_err(DistError::BadSetting)?;
        Self::connect_with(addr, policy).await
    }

    /// A client for `addr` that retries by `policy`.
    pub async fn connect_with(addr: &OciAddress, policy: RetryPolicy) -> Result<Self> {
        install_crypto_provider();
        let setup = |reason: String| DistError::Registry {
            url: addr.base_url(),
            op: "set up the HTTP client".into(),
            reason,
            attempts: 1,
        };
        let connect_timeout = Duration::from_secs(15);
        let read_timeout = Duration::from_secs(300);
        let user_agent = concat!("velo/", env!("CARGO_PKG_VERSION"));
        let config = ClientConfig {
            protocol: if addr.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(connect_timeout),
            read_timeout: Some(read_timeout),
            user_agent,
            ..Default::default()
        };
        let oci = oci_client::Client::try_from(config).map_err(|e| setup(chain(&e)))?;
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .user_agent(user_agent)
            .build()
            .map_err(|e| setup(chain(&e)))?;
        let scheme = if addr.plain_http { "http" } else { "https" };
        let host = addr.reference.resolve_registry();
        let origin =
            Url::parse(&format!("{scheme}://{host}/")).map_err(|e| DistError::BadAddress {
                text: addr.to_string(),
                reason: format!("the registry host is not a valid URL host: {e}"),
            })?;
        Ok(Self {
            http,
            oci,
            creds: credentials(addr.registry()),
            addr: addr.clone(),
            origin,
            auth: std::sync::Mutex::new([Authorization::Anonymous, Authorization::Anonymous]),
            reached: AtomicBool::new(false),
            retries: AtomicU64::new(0),
            policy,
        })
    }

    /// The address this connection serves.
    pub fn address(&self) -> &OciAddress {
        &self.addr
    }

    /// Retries made so far by this connection's requests.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn tries(&self, op: String, url: &Url) -> Tries<'_> {
        Tries {
            registry: self,
            op,
            url: url.to_string(),
            made: 0,
            waited: Duration::ZERO,
        }
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.origin
            .join(&format!("v2/{}/{path}", self.addr.reference.repository()))
            .map_err(|e| DistError::BadAddress {
                text: self.addr.to_string(),
                reason: format!("cannot make a URL of it: {e}"),
            })
    }

    fn blob_url(&self, digest: &str) -> Result<Url> {
        if !is_sha256_digest(digest) {
            return Err(DistError::BadArtifact {
                url: self.addr.manifest_url(),
                reason: format!("blob digest {digest:?} is malformed"),
            });
        }
        self.url(&format!("blobs/{digest}"))
    }

    fn manifest_url(&self) -> Result<Url> {
        let r = &self.addr.reference;
        let name = r.digest().or(r.tag()).unwrap_or("latest");
        self.url(&format!("manifests/{name}"))
    }

    /// Sends one request, with the authorization learnt so far; a 401 makes it learn (up to
    /// twice: the challenge request can itself fail) and send again. Only the registry's own
    /// host gets credentials (an upload location elsewhere does not).
    async fn send(
        &self,
        scope: Scope,
        method: Method,
        url: &Url,
        decorate: &mut (dyn FnMut(reqwest::RequestBuilder) -> reqwest::RequestBuilder + Send),
    ) -> std::result::Result<reqwest::Response, Attempt> {
        let ours = url.origin() == self.origin.origin();
        let mut learnt = 0;
        loop {
            let mut req = decorate(self.http.request(method.clone(), url.clone()));
            if ours {
                let auth = self
                    .auth
                    .lock()
                    .map(|a| a[scope as usize].clone())
                    .unwrap_or(Authorization::Anonymous);
                req = match auth {
                    Authorization::Anonymous => req,
                    Authorization::Basic(user, password) => req.basic_auth(user, Some(password)),
                    Authorization::Bearer(token) => req.bearer_auth(token),
                };
            }
            let resp = req.send().await.map_err(|e| transport(&e))?;
            self.reached.store(true, Ordering::Relaxed);
            if resp.status() == StatusCode::UNAUTHORIZED && ours && learnt < 2 {
                learnt += 1;
                self.learn_auth(scope).await?;
                continue;
            }
            return Ok(resp);
        }
    }

    /// Asks the registry what it wants (a token, or basic credentials) for `scope`.
    async fn learn_auth(&self, scope: Scope) -> std::result::Result<(), Attempt> {
        let op = match scope {
            Scope::Pull => RegistryOperation::Pull,
            Scope::Push => RegistryOperation::Push,
        };
        let got = match self.oci.auth(&self.addr.reference, &self.creds, op).await {
            Ok(Some(token)) => Authorization::Bearer(token),
            Ok(None) => match &self.creds {
                RegistryAuth::Basic(user, password) => {
                    Authorization::Basic(user.clone(), password.clone())
                }
                _ => Authorization::Anonymous,
            },
            Err(OciDistributionError::RequestError(e)) => return Err(transport(&e)),
            Err(OciDistributionError::ServerError { code, message, .. }) => {
                return Err(Attempt::Failed {
                    failure: Failure::Status(code),
                    reason: format!("the token request got HTTP {code}: {}", one_line(&message)),
                    retry_after: None,
                });
            }
            Err(e) => {
                return Err(Attempt::Failed {
                    failure: Failure::Status(401),
                    reason: format!("authentication failed: {}", chain(&e)),
                    retry_after: None,
                });
            }
        };
        if let Ok(mut a) = self.auth.lock() {
            a[scope as usize] = got;
        }
        Ok(())
    }

    /// The final error of a request that failed `attempts` times, the last with `failure`.
    fn give_up(
        &self,
        op: &str,
        url: &str,
        failure: Failure,
        reason: String,
        attempts: u32,
    ) -> DistError {
        let addr = &self.addr;
        let after = if attempts > 1 {
            format!("; {op}, after {attempts} attempts")
        } else {
            String::new()
        };
        match failure {
            Failure::Tls if !addr.plain_http => {
                return DistError::Unreachable {
                    url: addr.base_url(),
                    reason: format!("{reason}{after}"),
                    hint: "; a registry without TLS (a local one) needs --plain-http".into(),
                };
            }
            Failure::Connect => {
                return DistError::Unreachable {
                    url: addr.base_url(),
                    reason: format!("{reason}{after}"),
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
            _ => {}
        }
        let lower = reason.to_lowercase();
        let reason = if lower.contains("manifest unknown") || lower.contains("name unknown") {
            format!(
                "the registry has no {} (manifest unknown)",
                addr.reference.whole()
            )
        } else if failure == Failure::Status(401) {
            format!(
                "{reason} (velo uses the credentials of `docker login {}` — docker's config.json \
                 or its credential helper — or podman's auth.json)",
                addr.registry()
            )
        } else {
            reason
        };
        DistError::Registry {
            url: url.to_owned(),
            op: op.to_owned(),
            reason,
            attempts,
        }
    }

    /// Whether the repository has the blob; `what` says what it holds, for messages.
    pub async fn blob_exists(&self, digest: &str, what: &str) -> Result<bool> {
        let url = self.blob_url(digest)?;
        let mut tries = self.tries(format!("check blob ({what}) of {}", self.addr), &url);
        loop {
            match self.head(&url).await {
                Ok(found) => return Ok(found),
                Err(e) => tries.failed(e).await?,
            }
        }
    }

    async fn head(&self, url: &Url) -> std::result::Result<bool, Attempt> {
        let resp = self
            .send(Scope::Pull, Method::HEAD, url, &mut |r| r)
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_failure(resp).await),
        }
    }

    /// Uploads a blob held in memory.
    pub async fn push_bytes(&self, data: Vec<u8>, digest: &str, what: &str) -> Result<()> {
        let size = data.len() as u64;
        self.push(Upload::Bytes(data.into()), size, digest, what)
            .await
    }

    /// Uploads a blob of `size` bytes from a file (read from its start), streaming.
    pub async fn push_file(
        &self,
        file: std::fs::File,
        size: u64,
        digest: &str,
        what: &str,
    ) -> Result<()> {
        self.push(Upload::File(Arc::new(file)), size, digest, what)
            .await
    }

    async fn push(&self, data: Upload, size: u64, digest: &str, what: &str) -> Result<()> {
        let url = self.blob_url(digest)?;
        let start = self.url("blobs/uploads/")?;
        let mut tries = self.tries(format!("upload blob ({what}) to {}", self.addr), &url);
        loop {
            // After a failed attempt the blob may have landed all the same (only the answer was
            // lost): check before sending it again.
            let attempt = async {
                if tries.made > 0 && self.head(&url).await? {
                    return Ok(());
                }
                self.upload(&start, &data, size, digest).await
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e) => tries.failed(e).await?,
            }
        }
    }

    /// One upload session: `POST` for a location, `PUT` of the bytes there.
    async fn upload(
        &self,
        start: &Url,
        data: &Upload,
        size: u64,
        digest: &str,
    ) -> std::result::Result<(), Attempt> {
        let resp = self
            .send(Scope::Push, Method::POST, start, &mut |r| {
                r.header(CONTENT_LENGTH, 0)
            })
            .await?;
        if !resp.status().is_success() {
            return Err(status_failure(resp).await);
        }
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| protocol("the registry started an upload without a Location"))?;
        let mut put = start
            .join(location)
            .map_err(|e| protocol(&format!("the upload location {location:?} is invalid: {e}")))?;
        put.query_pairs_mut().append_pair("digest", digest);
        let resp = self
            .send(Scope::Push, Method::PUT, &put, &mut |r| {
                r.header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size)
                    .body(match data {
                        Upload::Bytes(b) => reqwest::Body::from(b.clone()),
                        Upload::File(f) => reqwest::Body::wrap_stream(file_stream(f.clone(), size)),
                    })
            })
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(status_failure(resp).await)
        }
    }

    /// Downloads a blob of `size` bytes into `out` (an empty file), checking its sha256; more
    /// bytes than `size` is an error, never written. `what` says what the blob holds, for
    /// messages. A download that breaks is resumed where it stopped.
    pub async fn pull_to_file(
        &self,
        digest: &str,
        size: u64,
        out: &mut std::fs::File,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
        what: &str,
    ) -> Result<Downloaded> {
        let url = self.blob_url(digest)?;
        let mut tries = self.tries(format!("download blob ({what}) of {}", self.addr), &url);
        let mut partial = Partial {
            out,
            hasher: sha2::Sha256::new(),
            got: 0,
            reported: 0,
        };
        loop {
            match self
                .download(&url, digest, size, &mut partial, on_bytes)
                .await
            {
                Ok(()) => break,
                Err(e) => tries.failed(e).await?,
            }
        }
        partial
            .out
            .rewind()
            .map_err(|e| DistError::io("rewind", "blob staging file", e))?;
        let found = format!("sha256:{}", hex::encode(partial.hasher.finalize()));
        Ok(if found == digest {
            Downloaded::Good
        } else {
            Downloaded::Mismatch(found)
        })
    }

    /// One `GET` of a blob, from where the last attempt stopped.
    async fn download(
        &self,
        url: &Url,
        digest: &str,
        size: u64,
        partial: &mut Partial<'_>,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> std::result::Result<(), Attempt> {
        let range = (partial.got > 0).then(|| format!("bytes={}-", partial.got));
        let resp = self
            .send(Scope::Pull, Method::GET, url, &mut |r| match &range {
                Some(v) => r.header(RANGE, v),
                None => r,
            })
            .await?;
        match resp.status() {
            StatusCode::OK => {
                if partial.got > 0 {
                    // The whole blob again: start over.
                    partial.restart()?;
                }
            }
            StatusCode::PARTIAL_CONTENT if partial.got > 0 => {
                let from = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(range_start);
                if from != Some(partial.got) {
                    partial.restart()?;
                    return Err(Attempt::Failed {
                        failure: Failure::Interrupted,
                        reason: "the registry answered a resumed download with another range"
                            .into(),
                        retry_after: None,
                    });
                }
            }
            _ if resp.status().is_success() => {
                return Err(protocol(&format!(
                    "the registry answered a download with HTTP {}",
                    resp.status()
                )));
            }
            _ => return Err(status_failure(resp).await),
        }
        let mut stream = resp.bytes_stream();
        while let Some(item) = stream.next().await {
            let chunk = item.map_err(|e| transport(&e))?;
            if partial.got + chunk.len() as u64 > size {
                return Err(Attempt::Fatal(DistError::Corrupt {
                    what: format!("blob {digest} ({url})"),
                    reason: format!("the registry sent more than its {size} bytes"),
                }));
            }
            partial
                .out
                .write_all(&chunk)
                .map_err(|e| DistError::io("write", "blob staging file", e))?;
            partial.hasher.update(&chunk);
            partial.got += chunk.len() as u64;
            if partial.got > partial.reported {
                on_bytes(partial.got - partial.reported);
                partial.reported = partial.got;
            }
        }
        if partial.got < size {
            return Err(Attempt::Failed {
                failure: Failure::Interrupted,
                reason: format!("the registry sent {} of its {size} bytes", partial.got),
                retry_after: None,
            });
        }
        Ok(())
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
        match self
            .pull_to_file(digest, size, &mut file, &|_| {}, &format!("the {what}"))
            .await?
        {
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
        let url = self.manifest_url()?;
        let body = bytes::Bytes::from(body);
        let mut tries = self.tries(format!("upload manifest to {}", self.addr), &url);
        loop {
            let attempt = async {
                let resp = self
                    .send(Scope::Push, Method::PUT, &url, &mut |r| {
                        r.header(CONTENT_TYPE, crate::artifact::MANIFEST_MEDIA_TYPE)
                            .body(body.clone())
                    })
                    .await?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(status_failure(resp).await)
                }
            };
            match attempt.await {
                Ok(()) => return Ok(digest),
                Err(e) => tries.failed(e).await?,
            }
        }
    }

    /// Downloads the manifest the address names; returns its bytes (at most one more than
    /// [`crate::artifact::MAX_MANIFEST_BYTES`]: the caller refuses more) and digest.
    pub async fn pull_manifest(&self) -> Result<(Vec<u8>, String)> {
        let url = self.manifest_url()?;
        let mut tries = self.tries(format!("download manifest of {}", self.addr), &url);
        let body = loop {
            match self.manifest_once(&url).await {
                Ok(body) => break body,
                Err(e) => tries.failed(e).await?,
            }
        };
        let digest = crate::artifact::sha256_digest(&body);
        if let Some(want) = self.addr.reference.digest()
            && want != digest
        {
            return Err(DistError::Corrupt {
                what: format!("the manifest {want} ({url})"),
                reason: format!("its bytes hash to {digest}"),
            });
        }
        Ok((body, digest))
    }

    async fn manifest_once(&self, url: &Url) -> std::result::Result<Vec<u8>, Attempt> {
        let resp = self
            .send(Scope::Pull, Method::GET, url, &mut |r| {
                r.header(ACCEPT, crate::artifact::MANIFEST_MEDIA_TYPE)
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_failure(resp).await);
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(item) = stream.next().await {
            body.extend_from_slice(&item.map_err(|e| transport(&e))?);
            if body.len() > crate::artifact::MAX_MANIFEST_BYTES {
                break;
            }
        }
        Ok(body)
    }
}

/// A blob file's bytes from offset 0, read with `pread` (no shared file position: an attempt
/// that is still being torn down cannot disturb the next one).
fn file_stream(
    file: Arc<std::fs::File>,
    size: u64,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    futures_util::stream::try_unfold(0u64, move |offset| {
        let file = file.clone();
        async move {
            if offset >= size {
                return Ok(None);
            }
            let n = (size - offset).min(1 << 20) as usize;
            let buf = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, offset).map(|()| buf)
            })
            .await
            .map_err(std::io::Error::other)??;
            Ok(Some((bytes::Bytes::from(buf), offset + n as u64)))
        }
    })
}

/// The first byte of a `Content-Range: bytes FIRST-LAST/SIZE`.
fn range_start(value: &str) -> Option<u64> {
    value
        .trim()
        .strip_prefix("bytes ")?
        .split_once('-')?
        .0
        .trim()
        .parse()
        .ok()
}

fn protocol(reason: &str) -> Attempt {
    Attempt::Failed {
        failure: Failure::Protocol,
        reason: reason.to_owned(),
        retry_after: None,
    }
}

/// A request that got no (complete) answer.
fn transport(e: &reqwest::Error) -> Attempt {
    let reason = chain(e);
    Attempt::Failed {
        failure: transport_failure(e, &reason),
        reason,
        retry_after: None,
    }
}

fn transport_failure(e: &reqwest::Error, text: &str) -> Failure {
    let lower = text.to_lowercase();
    let tls = lower.contains("invalidcontenttype")
        || lower.contains("corrupt message")
        || lower.contains("invalid http version")
        || lower.contains("certificate")
        || (lower.contains("tls") && lower.contains("handshake"));
    if tls {
        Failure::Tls
    } else if e.is_connect()
        || lower.contains("connection refused")
        || lower.contains("tcp connect error")
        || lower.contains("dns error")
    {
        Failure::Connect
    } else if e.is_timeout() {
        Failure::Timeout
    } else {
        Failure::Interrupted
    }
}

/// An error answer: its status, the registry's message, and its `Retry-After`.
async fn status_failure(resp: reqwest::Response) -> Attempt {
    let status = resp.status();
    let retry_after = retry::retry_after(
        status.as_u16(),
        resp.headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
    );
    // The body says why, in a few hundred bytes; a body that breaks off changes nothing.
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() > 4096 {
            break;
        }
    }
    Attempt::Failed {
        failure: Failure::Status(status.as_u16()),
        reason: describe_status(status, &body),
        retry_after,
    }
}

/// `HTTP 404 Not Found: MANIFEST_UNKNOWN: manifest unknown` from a status and an OCI error body.
fn describe_status(status: StatusCode, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<OciError>,
    }
    #[derive(serde::Deserialize)]
    struct OciError {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let mut text = format!("HTTP {status}");
    let detail = match serde_json::from_slice::<Envelope>(body) {
        Ok(env) => env
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => one_line(&String::from_utf8_lossy(body)),
    };
    if !detail.is_empty() {
        text.push_str(": ");
        text.push_str(&detail);
    }
    text
}

/// Text on one line, at most 300 characters.
fn one_line(text: &str) -> String {
    let mut out: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((cut, _)) = out.char_indices().nth(300) {
        out.truncate(cut);
        out.push('…');
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_start() {
        assert_eq!(range_start("bytes 100-199/200"), Some(100));
        assert_eq!(range_start("bytes 0-0/1"), Some(0));
        assert_eq!(range_start("bytes */200"), None);
        assert_eq!(range_start("items 1-2/3"), None);
    }

    #[test]
    fn status_descriptions() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
        assert_eq!(
            describe_status(StatusCode::NOT_FOUND, body),
            "HTTP 404 Not Found: MANIFEST_UNKNOWN: manifest unknown"
        );
        assert_eq!(
            describe_status(StatusCode::SERVICE_UNAVAILABLE, b"  try\n later "),
            "HTTP 503 Service Unavailable: try later"
        );
        assert_eq!(
            describe_status(StatusCode::INTERNAL_SERVER_ERROR, b""),
            "HTTP 500 Internal Server Error"
        );
        assert_eq!(one_line(&"x".repeat(400)).chars().count(), 301);
    }
}
