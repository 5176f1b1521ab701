//! Retrying registry requests: which failures are worth another try, and how long to wait.
//!
//! Every request to a registry (a blob's `HEAD`, `GET` or upload, a manifest's `GET` or `PUT`) is
//! retried on its own, so what earlier requests fetched is kept. The decisions are pure functions
//! ([`is_transient`], [`next_delay`], [`RetryPolicy::from_settings`]) so that they can be tested
//! without a network; [`crate::registry`] runs the loop.
//!
//! The loop is written out rather than taken from a crate such as `backon`: a download carries
//! state from one attempt to the next (the bytes already written and hashed, to resume with a
//! `Range` request), which `backon`'s `FnMut() -> Future` closures can only thread through by
//! moving it in and out of every attempt; the delay must follow the failure's `Retry-After`
//! within a budget shared by all attempts; and the final error must say how many attempts were
//! made. What is left of the loop is a dozen lines around [`next_delay`].

use std::time::Duration;

/// The environment variable that sets the retries per request (`0` turns retrying off).
pub const RETRIES_ENV: &str = "VELO_REGISTRY_RETRIES";
/// The environment variable that sets the first backoff delay, in milliseconds.
pub const DELAY_ENV: &str = "VELO_REGISTRY_RETRY_DELAY_MS";

/// How a request is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first one included (1: no retries).
    pub attempts: u32,
    /// The backoff before the first retry; it doubles for each further one, up to `max_delay`.
    pub base_delay: Duration,
    /// The longest wait before one retry; a longer `Retry-After` is cut to this.
    pub max_delay: Duration,
    /// The longest time spent waiting for one request, all its retries together; a retry that
    /// would exceed it is not made.
    pub max_total: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts; backoff 0.5 s, 1 s, 2 s, 4 s (each jittered down by up to half); at most 30 s
    /// before one retry and 60 s of waiting per request.
    fn default() -> Self {
        Self {
            attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_total: Duration::from_secs(60),
        }
    }
}

/// The largest retry count a setting may ask for.
const MAX_RETRIES: u32 = 100;

impl RetryPolicy {
    /// The default policy changed by the values of [`RETRIES_ENV`] (retries per request, so
    /// attempts are one more; `0` makes one attempt) and [`DELAY_ENV`] (the first backoff in
    /// milliseconds). Unset or empty values keep the default; anything else that is not a number
    /// in range is an error naming the variable.
    pub fn from_settings(retries: Option<&str>, delay_ms: Option<&str>) -> Result<Self, String> {
        let mut policy = Self::default();
        let number = |name: &str, text: &str, max: u64| -> Result<u64, String> {
            text.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{name}={text:?} is not a whole number from 0 to {max}"))
        };
        if let Some(text) = retries.filter(|t| !t.trim().is_empty()) {
            let n = number(RETRIES_ENV, text, MAX_RETRIES.into())?;
            // At most MAX_RETRIES, so it fits.
            policy.attempts = u32::try_from(n).unwrap_or(MAX_RETRIES) + 1;
        }
        if let Some(text) = delay_ms.filter(|t| !t.trim().is_empty()) {
            let ms = number(DELAY_ENV, text, 60_000)?;
            policy.base_delay = Duration::from_millis(ms);
        }
        Ok(policy)
    }

    /// The policy the environment asks for ([`RetryPolicy::from_settings`]).
    pub fn from_env() -> Result<Self, String> {
        let retries = std::env::var(RETRIES_ENV).ok();
        let delay = std::env::var(DELAY_ENV).ok();
        Self::from_settings(retries.as_deref(), delay.as_deref())
    }
}

/// How one attempt at a request failed, as far as retrying it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The registry answered with this HTTP status.
    Status(u16),
    /// No connection could be made (refused, unreachable, name not resolved, connect timeout).
    Connect,
    /// The registry did not answer in time after the request was sent.
    Timeout,
    /// The connection broke mid-request or mid-answer (reset, closed early, a body cut short).
    Interrupted,
    /// The TLS handshake failed (a certificate, or TLS spoken to a plain-HTTP registry).
    Tls,
    /// The registry's answer breaks the protocol (a missing `Location`, a bad `Content-Range`).
    Protocol,
}

/// Whether another attempt may succeed where this one failed.
///
/// Transient: HTTP 408, 429 and 5xx (but 501 and 505, which say the request can never work),
/// timeouts, and connections broken mid-way. A connection that cannot be made at all is
/// transient only once the registry has answered before (`reached`): a registry that is down or
/// mistyped is said so at once, one that drops a connection in the middle of a transfer is
/// retried. Everything else (401/403/404 and the other 4xx, TLS failures, protocol errors) is
/// permanent; so are bytes that do not match their digest, which never reach this function.
pub fn is_transient(failure: Failure, reached: bool) -> bool {
    match failure {
        Failure::Status(code) => {
            code == 408 || code == 429 || ((500..600).contains(&code) && code != 501 && code != 505)
        }
        Failure::Connect => reached,
        Failure::Timeout | Failure::Interrupted => true,
        Failure::Tls | Failure::Protocol => false,
    }
}

/// The wait before the next attempt, or `None` to give up.
///
/// `attempts_made` attempts have failed so far (the last with `failure`), after `waited` spent
/// waiting between them. The wait is the failure's `Retry-After` if it gave one (cut to
/// `max_delay`), else exponential backoff with "equal jitter": half of
/// `base_delay × 2^(attempts_made − 1)` (capped at `max_delay`) plus `jitter` (a number in
/// `[0, 1]`) times the other half. No retry past `policy.attempts`, past `max_total`, or after a
/// permanent failure.
pub fn next_delay(
    policy: &RetryPolicy,
    failure: Failure,
    reached: bool,
    attempts_made: u32,
    waited: Duration,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Option<Duration> {
    if !is_transient(failure, reached) || attempts_made >= policy.attempts {
        return None;
    }
    let delay = match retry_after {
        Some(after) => after.min(policy.max_delay),
        None => {
            let shift = attempts_made.saturating_sub(1).min(31);
            let full = policy
                .base_delay
                .saturating_mul(1 << shift)
                .min(policy.max_delay);
            let jitter = if jitter.is_finite() {
                jitter.clamp(0.0, 1.0)
            } else {
                0.0
            };
            full / 2 + (full / 2).mul_f64(jitter)
        }
    };
    (waited.saturating_add(delay) <= policy.max_total).then_some(delay)
}

/// The wait a response asks for: its `Retry-After` header, honoured on 429 (too many requests)
/// and 503 (unavailable), the statuses it is defined for in a retry.
pub fn retry_after(status: u16, header: Option<&str>) -> Option<Duration> {
    matches!(status, 429 | 503)
        .then(|| header.and_then(parse_retry_after))
        .flatten()
}

/// A `Retry-After` header's value in seconds (the HTTP-date form is not used by registries
/// velo knows of and is ignored: the backoff applies then).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A number in `[0, 1]` that differs from call to call, for jitter (no RNG crate needed:
/// the standard library's hasher keys are random per process, and a counter varies the input).
pub fn jitter() -> f64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let h = std::collections::hash_map::RandomState::new().hash_one(n);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    #[test]
    fn transient_and_permanent_failures() {
        for code in [408, 429, 500, 502, 503, 504, 599] {
            assert!(is_transient(Failure::Status(code), false), "{code}");
        }
        for code in [400, 401, 403, 404, 405, 409, 416, 501, 505, 200, 301] {
            assert!(!is_transient(Failure::Status(code), true), "{code}");
        }
        assert!(is_transient(Failure::Timeout, false));
        assert!(is_transient(Failure::Interrupted, false));
        assert!(
            !is_transient(Failure::Connect, false),
            "first contact fails fast"
        );
        assert!(
            is_transient(Failure::Connect, true),
            "a dropped registry is retried"
        );
        assert!(!is_transient(Failure::Tls, true));
        assert!(!is_transient(Failure::Protocol, true));
    }

    #[test]
    fn backoff_doubles_and_retry_after_wins() {
        let p = policy();
        let d = |n, ra, j| next_delay(&p, Failure::Status(503), true, n, Duration::ZERO, ra, j);
        assert_eq!(d(1, None, 1.0), Some(Duration::from_millis(500)));
        assert_eq!(d(1, None, 0.0), Some(Duration::from_millis(250)));
        assert_eq!(d(2, None, 1.0), Some(Duration::from_secs(1)));
        assert_eq!(d(4, None, 1.0), Some(Duration::from_secs(4)));
        assert_eq!(d(5, None, 1.0), None, "5 attempts made: no more");
        assert_eq!(d(1, Some(Duration::ZERO), 0.7), Some(Duration::ZERO));
        assert_eq!(
            d(3, Some(Duration::from_secs(7)), 0.7),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            d(1, Some(Duration::from_secs(3600)), 0.7),
            Some(Duration::from_secs(30)),
            "capped"
        );
        // The budget: 50 s waited, a 30 s Retry-After would pass 60 s.
        let late = next_delay(
            &p,
            Failure::Status(429),
            true,
            2,
            Duration::from_secs(50),
            Some(Duration::from_secs(30)),
            0.5,
        );
        assert_eq!(late, None);
        // Permanent: never.
        assert_eq!(
            next_delay(&p, Failure::Status(404), true, 1, Duration::ZERO, None, 0.5),
            None
        );
    }

    #[test]
    fn settings() {
        assert_eq!(RetryPolicy::from_settings(None, None), Ok(policy()));
        assert_eq!(
            RetryPolicy::from_settings(Some(""), Some(" ")),
            Ok(policy())
        );
        let p = RetryPolicy::from_settings(Some("0"), None).unwrap();
        assert_eq!(p.attempts, 1);
        let p = RetryPolicy::from_settings(Some(" 9 "), Some("20")).unwrap();
        assert_eq!((p.attempts, p.base_delay), (10, Duration::from_millis(20)));
        for bad in ["-1", "x", "101", "1.5"] {
            let e = RetryPolicy::from_settings(Some(bad), None).unwrap_err();
            assert!(e.contains(RETRIES_ENV), "{e}");
        }
        let e = RetryPolicy::from_settings(None, Some("60001")).unwrap_err();
        assert!(e.contains(DELAY_ENV), "{e}");
    }

    #[test]
    fn retry_after_values() {
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(" 12 "), Some(Duration::from_secs(12)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-3"), None);
        assert_eq!(retry_after(429, Some("1")), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(503, Some("0")), Some(Duration::ZERO));
        assert_eq!(retry_after(503, None), None);
        assert_eq!(retry_after(500, Some("5")), None, "only 429 and 503");
    }

    #[test]
    fn jitter_is_in_range_and_varies() {
        let v: Vec<f64> = (0..64).map(|_| jitter()).collect();
        assert!(v.iter().all(|j| (0.0..=1.0).contains(j)));
        assert!(v.iter().any(|j| (j - v[0]).abs() > 1e-9));
    }

    fn failures() -> impl Strategy<Value = Failure> {
        prop_oneof![
            (100u16..1000).prop_map(Failure::Status),
            Just(Failure::Connect),
            Just(Failure::Timeout),
            Just(Failure::Interrupted),
            Just(Failure::Tls),
            Just(Failure::Protocol),
        ]
    }

    fn policies() -> impl Strategy<Value = RetryPolicy> {
        (1u32..12, 0u64..5_000, 0u64..60_000, 0u64..600_000).prop_map(|(a, b, m, t)| RetryPolicy {
            attempts: a,
            base_delay: Duration::from_millis(b),
            max_delay: Duration::from_millis(m),
            max_total: Duration::from_millis(t),
        })
    }

    proptest! {
        /// Whatever happens, a retry is only made for a transient failure, within the attempts,
        /// within the cap and within the budget; and the backoff never exceeds its exponential
        /// bound, nor falls below half of it.
        #[test]
        fn delays_stay_within_the_policy(
            p in policies(),
            f in failures(),
            reached in any::<bool>(),
            n in 1u32..20,
            waited_ms in 0u64..700_000,
            ra in proptest::option::of(0u64..100_000),
            j in any::<f64>(),
        ) {
            let waited = Duration::from_millis(waited_ms);
            let ra = ra.map(Duration::from_millis);
            let got = next_delay(&p, f, reached, n, waited, ra, j);
            if let Some(d) = got {
                prop_assert!(is_transient(f, reached));
                prop_assert!(n < p.attempts);
                prop_assert!(d <= p.max_delay);
                prop_assert!(waited + d <= p.max_total);
                match ra {
                    Some(ra) => prop_assert_eq!(d, ra.min(p.max_delay)),
                    None => {
                        let bound = p.base_delay.saturating_mul(1 << (n - 1).min(31)).min(p.max_delay);
                        prop_assert!(d <= bound);
                        prop_assert!(d >= bound / 2);
                    }
                }
            } else {
                // The longest wait it could have asked for would pass the budget.
                let longest = match ra {
                    Some(ra) => ra.min(p.max_delay),
                    None => p.base_delay.saturating_mul(1 << (n - 1).min(31)).min(p.max_delay),
                };
                prop_assert!(
                    !is_transient(f, reached) || n >= p.attempts || waited + longest > p.max_total
                );
            }
        }

        /// A whole sequence of transient failures: attempts and total wait stay bounded.
        #[test]
        fn a_run_of_failures_is_bounded(p in policies(), ras in proptest::collection::vec(proptest::option::of(0u64..40_000), 0..30), j in 0.0f64..=1.0) {
            let mut waited = Duration::ZERO;
            let mut made = 1;
            for ra in ras {
                match next_delay(&p, Failure::Status(503), true, made, waited, ra.map(Duration::from_millis), j) {
                    Some(d) => { waited += d; made += 1; }
                    None => break,
                }
            }
            prop_assert!(made <= p.attempts);
            prop_assert!(waited <= p.max_total);
        }

        /// Only the documented classes are retried.
        #[test]
        fn classification_is_total(code in 0u16..1000, reached in any::<bool>()) {
            let t = is_transient(Failure::Status(code), reached);
            prop_assert_eq!(t, code == 408 || code == 429 || ((500..600).contains(&code) && code != 501 && code != 505));
        }
    }
}
