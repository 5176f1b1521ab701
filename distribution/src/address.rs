//! `oci://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]` addresses.

use oci_client::Reference;

use crate::error::{DistError, Result};

/// The scheme every registry address starts with.
pub const SCHEME: &str = "oci://";

/// A place in a registry: a repository and a tag or manifest digest.
#[derive(Debug, Clone)]
pub struct OciAddress {
    /// The parsed reference (registry, repository, tag or digest).
    pub reference: Reference,
    /// True to talk plain HTTP (a local registry without TLS).
    pub plain_http: bool,
    /// True if the text named a tag or digest (else the tag is `latest`).
    pub explicit_tag: bool,
}

impl OciAddress {
    /// Parses `oci://HOST[:PORT]/REPO[:TAG|@sha256:…]`. The host is required (no implicit
    /// Docker Hub), and so is a tag or digest for a push (checked by the caller).
    pub fn parse(text: &str, plain_http: bool) -> Result<Self> {
        let bad = |reason: &str| DistError::BadAddress {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = text.strip_prefix(SCHEME).ok_or_else(|| {
            bad("it must start with oci://, e.g. oci://registry.example.com/team/deps:v1")
        })?;
        let (host, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("it needs a repository after the host, e.g. oci://HOST/REPO:TAG"))?;
        if host.is_empty() || !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(bad(
                "the first part must be a registry host (with a dot or a port, or localhost)",
            ));
        }
        if path.is_empty() {
            return Err(bad("the repository is empty"));
        }
        let reference: Reference = rest
            .parse()
            .map_err(|e: oci_client::ParseError| bad(&e.to_string()))?;
        if reference.registry() != host {
            return Err(bad(
                "the registry host could not be told apart from the repository",
            ));
        }
        let last = path.rsplit('/').next().unwrap_or(path);
        Ok(Self {
            reference,
            plain_http,
            explicit_tag: last.contains(':') || last.contains('@'),
        })
    }

    /// The registry host (with port).
    pub fn registry(&self) -> &str {
        self.reference.registry()
    }

    /// `http://HOST` or `https://HOST`.
    pub fn base_url(&self) -> String {
        format!(
            "{}://{}",
            if self.plain_http { "http" } else { "https" },
            self.registry()
        )
    }

    /// The repository's URL, for messages.
    pub fn repo_url(&self) -> String {
        format!("{}/v2/{}", self.base_url(), self.reference.repository())
    }

    /// The URL of one blob, for messages.
    pub fn blob_url(&self, digest: &str) -> String {
        format!("{}/blobs/{digest}", self.repo_url())
    }

    /// The URL of the manifest this address names, for messages.
    pub fn manifest_url(&self) -> String {
        let tag = self
            .reference
            .digest()
            .or(self.reference.tag())
            .unwrap_or("latest");
        format!("{}/manifests/{tag}", self.repo_url())
    }
}

impl std::fmt::Display for OciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}", self.reference.whole())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_tags_and_digests() {
        let a = OciAddress::parse("oci://127.0.0.1:5000/team/deps:v1", true).expect("test fixture");
        assert_eq!(a.registry(), "127.0.0.1:5000");
        assert_eq!(a.reference.repository(), "team/deps");
        assert_eq!(a.reference.tag(), Some("v1"));
        assert_eq!(a.base_url(), "http://127.0.0.1:5000");
        let d = format!("sha256:{}", "a".repeat(64));
        let b = OciAddress::parse(&format!("oci://ghcr.io/o/r@{d}"), false).expect("test fixture");
        assert_eq!(b.reference.digest(), Some(d.as_str()));
        assert_eq!(
            b.manifest_url(),
            format!("https://ghcr.io/v2/o/r/manifests/{d}")
        );
        for bad in [
            "127.0.0.1:5000/r:t",
            "oci://",
            "oci://host.example",
            "oci://deps:v1",
            "oci://registry.example.com/",
            "oci://registry.example.com/UPPER:t",
        ] {
            assert!(
                OciAddress::parse(bad, false).is_err(),
                "{bad} must not parse"
            );
        }
    }
}
