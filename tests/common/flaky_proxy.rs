//! A proxy in front of a test registry that fails chosen requests, deterministically: every
//! Nth request (cycling through a 500, a 503 with `Retry-After: 0`, a 429 with
//! `Retry-After: 1`, and a connection cut in the middle of a body), and rules for one path (a
//! status, a cut, a flipped byte), each for a number of times or for ever. Every request is
//! logged (method, path, `Range`, what was done to it).
//!
//! One request per connection (`Connection: close` both ways), one thread per connection; the
//! accepting thread stops when the proxy is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the proxy does to a request instead of passing it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers with this status (and `Retry-After: N` if given); nothing reaches the registry.
    Status(u16, Option<u32>),
    /// Cuts the connection in the middle: half of a request's body (uploads), or half of the
    /// registry's answer's body (downloads), or, with neither, before any answer.
    Cut,
    /// Passes the request on and flips one byte in the middle of the answer's body.
    Flip,
}

/// The faults every Nth request gets, in turn.
pub const CYCLE: [Fault; 4] = [
    Fault::Status(500, None),
    Fault::Status(503, Some(0)),
    Fault::Status(429, Some(1)),
    Fault::Cut,
];

/// A fault for requests of one method whose path contains a string.
#[derive(Debug, Clone)]
pub struct Rule {
    pub method: &'static str,
    pub path_contains: String,
    pub fault: Fault,
    /// How many more requests it applies to (`None`: all).
    pub times: Option<u32>,
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub fault: Option<Fault>,
}

#[derive(Default)]
struct Plan {
    every: Option<u64>,
    rules: Vec<Rule>,
}

struct Shared {
    upstream: u16,
    plan: Mutex<Plan>,
    log: Mutex<Vec<Logged>>,
    requests: AtomicU64,
    cycled: AtomicU64,
    stop: AtomicBool,
}

/// A running proxy.
pub struct FlakyProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FlakyProxy {
    /// Starts a proxy to the registry at 127.0.0.1:`upstream`, passing everything on.
    pub fn start(upstream: u16) -> Self {
        let listener =
            TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            upstream,
            plan: Mutex::new(Plan::default()),
            log: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            cycled: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(&s, conn);
                });
            }
        });
        Self {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// The proxy's host:port.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `oci://127.0.0.1:PORT/REPO_AND_TAG`
    pub fn url(&self, repo_and_tag: &str) -> String {
        format!("oci://{}/{repo_and_tag}", self.host())
    }

    /// Fails every `n`th request (counting all requests) with the next fault of [`CYCLE`];
    /// `None` stops it.
    pub fn fail_every(&self, n: Option<u64>) {
        self.shared.plan.lock().unwrap().every = n;
    }

    /// Adds a rule (checked before the every-Nth faults).
    pub fn add_rule(&self, rule: Rule) {
        self.shared.plan.lock().unwrap().rules.push(rule);
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.shared.plan.lock().unwrap().rules.clear();
    }

    /// The requests seen since the last [`FlakyProxy::take_log`].
    pub fn take_log(&self) -> Vec<Logged> {
        std::mem::take(&mut *self.shared.log.lock().unwrap())
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread up.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn decide(&self, method: &str, path: &str) -> Option<Fault> {
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let mut plan = self.plan.lock().unwrap();
        for rule in plan.rules.iter_mut() {
            if rule.method == method && path.contains(&rule.path_contains) && rule.times != Some(0)
            {
                if let Some(t) = &mut rule.times {
                    *t -= 1;
                }
                return Some(rule.fault);
            }
        }
        let every = plan.every?;
        n.is_multiple_of(every).then(|| {
            let i = self.cycled.fetch_add(1, Ordering::SeqCst) as usize;
            CYCLE[i % CYCLE.len()]
        })
    }
}

/// A request's or an answer's head: its first line, its headers, its body's framing.
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn read(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
        let mut first = String::new();
        if r.read_line(&mut first)? == 0 {
            return Ok(None);
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("head cut short"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        Ok(Some(Head {
            first: first.trim_end().to_owned(),
            headers,
        }))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> u64 {
        self.get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    /// The head again, with `Connection: close` instead of any connection headers.
    fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.first);
        for (k, v) in &self.headers {
            let k_lower = k.to_ascii_lowercase();
            if k_lower == "connection" || k_lower == "keep-alive" {
                continue;
            }
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("Connection: close\r\n\r\n");
        out.into_bytes()
    }
}

/// Copies (or, with `out` None, reads away) a body of `len` bytes or a chunked body.
fn body<W: Write + ?Sized>(
    r: &mut impl BufRead,
    mut out: Option<&mut W>,
    head: &Head,
) -> std::io::Result<()> {
    if head.chunked() {
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            if let Some(o) = out.as_deref_mut() {
                o.write_all(line.as_bytes())?;
            }
            let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            // The chunk and its CRLF (or, after the last, the final CRLF).
            copy_n(r, out.as_deref_mut(), size + 2)?;
            if size == 0 {
                return Ok(());
            }
        }
    }
    copy_n(r, out, head.content_length())
}

fn copy_n<W: Write + ?Sized>(
    r: &mut impl Read,
    out: Option<&mut W>,
    n: u64,
) -> std::io::Result<()> {
    let mut limited = r.take(n);
    let copied = match out {
        Some(o) => std::io::copy(&mut limited, o)?,
        None => std::io::copy(&mut limited, &mut std::io::sink())?,
    };
    if copied < n {
        return Err(std::io::Error::other("body cut short"));
    }
    Ok(())
}

fn reason(code: u16) -> &'static str {
    match code {
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Injected",
    }
}

fn serve(shared: &Shared, client: TcpStream) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let Some(req) = Head::read(&mut from_client)? else {
        return Ok(());
    };
    let mut parts = req.first.split(' ');
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    if shared.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    let fault = shared.decide(&method, &path);
    shared.log.lock().unwrap().push(Logged {
        method: method.clone(),
        path,
        range: req.get("range").map(str::to_owned),
        fault,
    });
    let has_body = req.chunked() || req.content_length() > 0;
    match fault {
        Some(Fault::Status(code, retry_after)) => {
            body(&mut from_client, None::<&mut std::io::Sink>, &req)?;
            let text: &[u8] = if code == 404 {
                br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#
            } else {
                b"injected fault"
            };
            let text = if method == "HEAD" { &b""[..] } else { text };
            let mut resp = format!(
                "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n",
                reason(code),
                text.len()
            );
            if let Some(s) = retry_after {
                resp.push_str(&format!("Retry-After: {s}\r\n"));
            }
            resp.push_str("\r\n");
            to_client.write_all(resp.as_bytes())?;
            to_client.write_all(text)?;
            return Ok(());
        }
        Some(Fault::Cut) if has_body => {
            // Half of the upload, then the connection goes.
            let half = req.content_length() / 2;
            copy_n(&mut from_client, None::<&mut std::io::Sink>, half)?;
            return Ok(());
        }
        _ => {}
    }
    let upstream = TcpStream::connect((Ipv4Addr::LOCALHOST, shared.upstream))?;
    upstream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut to_upstream = upstream.try_clone()?;
    to_upstream.write_all(&req.bytes())?;
    body(&mut from_client, Some(&mut to_upstream), &req)?;
    let mut from_upstream = BufReader::new(upstream);
    let Some(resp) = Head::read(&mut from_upstream)? else {
        return Ok(());
    };
    let len = if method == "HEAD" {
        0
    } else {
        resp.content_length()
    };
    match fault {
        Some(Fault::Cut) => {
            // Half of the answer's body (none at all if it has none), then the connection goes.
            if len > 1 {
                to_client.write_all(&resp.bytes())?;
                copy_n(&mut from_upstream, Some(&mut to_client), len / 2)?;
            }
            Ok(())
        }
        Some(Fault::Flip) => {
            to_client.write_all(&resp.bytes())?;
            let mut data = Vec::new();
            from_upstream.take(len).read_to_end(&mut data)?;
            if let Some(b) = data.get_mut(len as usize / 2) {
                *b ^= 0x55;
            }
            to_client.write_all(&data)
        }
        _ => {
            to_client.write_all(&resp.bytes())?;
            std::io::copy(&mut from_upstream, &mut to_client).map(|_| ())
        }
    }
}
