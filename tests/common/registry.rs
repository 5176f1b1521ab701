//! A real OCI registry for tests and benchmarks: Debian's `docker-registry` (distribution 2.8),
//! started on 127.0.0.1 with its own config file and storage in a temp dir, stopped (by its pid)
//! and removed on drop, even when the test fails.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's package installs the registry.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A user and password the registry accepts when started with [`Registry::start_with_auth`]
/// (bcrypt hash of `velo-secret`, as `htpasswd -B` writes it).
pub const AUTH_USER: &str = "velo";
pub const AUTH_PASSWORD: &str = "velo-secret";
const AUTH_HTPASSWD: &str = "velo:$2a$05$g3QUym3GFL.uN1jN/fCvjOTXpofeJ0E8QfptZfbIkPrljzWn4wiKm\n";

/// A running registry.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Registry {
    /// Starts a registry without authentication.
    pub fn start() -> Self {
        Self::start_inner(false)
    }

    /// Starts a registry that requires [`AUTH_USER`]/[`AUTH_PASSWORD`] (HTTP basic).
    pub fn start_with_auth() -> Self {
        Self::start_inner(true)
    }

    fn start_inner(auth: bool) -> Self {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: these tests need a real OCI registry. Install it with \
             `apt-get install docker-registry` (scripts/install-deps does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("velo-registry-")
            .tempdir()
            .expect("tempdir");
        let mut last_log = String::new();
        // A free port can be taken between our probe and the registry's bind: try a few.
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            let htpasswd = dir.path().join("htpasswd");
            let auth_section = if auth {
                std::fs::write(&htpasswd, AUTH_HTPASSWD).expect("write htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: velo-test\n    path: {}\n",
                    htpasswd.display()
                )
            } else {
                String::new()
            };
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n{auth_section}",
                    dir.path().join("data").display()
                ),
            )
            .expect("write registry config");
            let log = std::fs::File::create(dir.path().join("log")).expect("log file");
            let child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log)
                .spawn()
                .expect("start docker-registry");
            let mut child = child;
            if wait_ready(&mut child, port, Duration::from_secs(30)) {
                return Registry { child, dir, port };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        }
        panic!("docker-registry did not come up on 127.0.0.1; its log:\n{last_log}");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the registry now (to test a registry that is down).
    pub fn stop(&mut self) {
        self.kill();
    }

    /// The registry's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The registry's host:port.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `oci://127.0.0.1:PORT/REPO_AND_TAG`
    pub fn url(&self, repo_and_tag: &str) -> String {
        format!("oci://{}/{repo_and_tag}", self.host())
    }

    /// The registry's storage root.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Every blob's data file in the registry's storage.
    pub fn blob_files(&self) -> Vec<PathBuf> {
        let root = self.storage().join("docker/registry/v2/blobs/sha256");
        let mut out = Vec::new();
        let Ok(fans) = std::fs::read_dir(&root) else {
            return out;
        };
        for fan in fans.flatten() {
            for blob in std::fs::read_dir(fan.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let data = blob.path().join("data");
                if data.is_file() {
                    out.push(data);
                }
            }
        }
        out.sort();
        out
    }

    /// The data file of the blob `sha256:HEX`.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// `GET path` on the registry: (status, body).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        http(self.port, "GET", path, &[], &[]).expect("GET from the registry")
    }

    /// The OCI manifest `repo:tag` as JSON.
    pub fn manifest(&self, repo: &str, tag: &str) -> serde_json::Value {
        let (status, body) = http(
            self.port,
            "GET",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            &[],
        )
        .expect("GET manifest");
        assert_eq!(
            status,
            200,
            "manifest {repo}:{tag}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).expect("manifest JSON")
    }

    /// A blob's bytes.
    pub fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        let (status, body) = self.get(&format!("/v2/{repo}/blobs/{digest}"));
        assert_eq!(status, 200, "blob {digest}");
        body
    }

    /// Uploads a blob (monolithic POST + PUT, as any client would); returns `sha256:…`.
    pub fn put_blob(&self, repo: &str, data: &[u8]) -> String {
        use sha2::Digest as _;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)));
        let (status, headers) = http_head(self.port, "POST", &format!("/v2/{repo}/blobs/uploads/"))
            .expect("POST upload");
        assert_eq!(status, 202, "start upload");
        let location = headers
            .lines()
            .find_map(|l| {
                l.strip_prefix("Location: ")
                    .or_else(|| l.strip_prefix("location: "))
            })
            .expect("Location header")
            .trim()
            .to_owned();
        let path = location
            .split_once("127.0.0.1")
            .map(|(_, rest)| {
                rest.split_once('/')
                    .map(|(_, p)| format!("/{p}"))
                    .unwrap_or_default()
            })
            .unwrap_or(location.clone());
        let sep = if path.contains('?') { '&' } else { '?' };
        let (status, body) = http(
            self.port,
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            data,
        )
        .expect("PUT blob");
        assert_eq!(
            status,
            201,
            "finish upload: {}",
            String::from_utf8_lossy(&body)
        );
        digest
    }

    /// Uploads a manifest under a tag.
    pub fn put_manifest(&self, repo: &str, tag: &str, manifest: &[u8]) {
        let (status, body) = http(
            self.port,
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            manifest,
        )
        .expect("PUT manifest");
        assert_eq!(
            status,
            201,
            "PUT manifest: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `GET /v2/` until it answers (200, or 401 with auth), the process dies or time runs out.
fn wait_ready(child: &mut Child, port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Some(status) = http_status(port, "/v2/") {
            return status == 200 || status == 401;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn free_port() -> u16 {
    let l =
        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    http(port, "GET", path, &[], &[]).map(|(s, _)| s)
}

/// A minimal HTTP/1.0 request to 127.0.0.1:port (no client library needed): status and body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, Vec<u8>)> {
    let resp = http_raw(port, method, path, headers, body)?;
    let text = String::from_utf8_lossy(&resp);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body_at = resp.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some((status, resp[body_at..].to_vec()))
}

/// Status and header text of a bodiless request.
fn http_head(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let resp = http_raw(port, method, path, &[], &[])?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let end = text.find("\r\n\r\n").unwrap_or(text.len());
    Some((status, text[..end].replace("\r\n", "\n")))
}

fn http_raw(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    Some(resp)
}
