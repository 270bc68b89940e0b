//! The router's client connections, served by hyper's HTTP/1 server from an
//! accept loop of its own: `axum::serve` neither bounds how many connections
//! it holds nor exposes hyper's limits on a request head.
//!
//! - At most `max_connections` are served at once (a [`Semaphore`] permit
//!   each). One more is accepted and closed at once, so that a flood of idle
//!   connections holds no descriptor past the limit (the kernel's backlog
//!   would keep them waiting); counted (`connections_refused` in the status,
//!   `dynamollm_router_refused_total{reason="max_connections"}`) and logged at
//!   most every [`LOG_EVERY`]. The limit is lowered at start to fit the
//!   open-files limit ([`fit_to_descriptors`]), so that the API, the state
//!   file and the telemetry store keep descriptors however many clients come.
//! - hyper's `header_read_timeout` closes a connection that sends no whole
//!   request head within `header_timeout_s` of opening or, kept alive, of the
//!   end of its previous answer. It does not run while an answer is written:
//!   a stream has no time limit.
//! - A head over `max_header_bytes` gets hyper's 431.
//! - An accept that fails for want of descriptors is logged at most every
//!   [`LOG_EVERY`] and retried after a pause.

use crate::config::RouterSection;
use crate::Shared;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Descriptors left to the rest of the service (the API's connections, the
/// state file, the telemetry store, MQTT, engine and exporter scrapes, action
/// commands) when `max_connections` is fitted to the open-files limit.
pub const RESERVED_DESCRIPTORS: u64 = 512;
/// Descriptors one client connection may hold: its own, and the engine
/// connection of the request it carries.
pub const DESCRIPTORS_PER_CONNECTION: u64 = 2;
/// The least often a repeated refusal or accept error is logged.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why the router turned a connection or a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` were open: closed as soon as accepted.
    MaxConnections,
    /// No whole request head within `header_timeout_s` (of opening, or of the previous answer).
    HeaderTimeout,
    /// A head over `max_header_bytes` (431).
    HeadTooLarge,
    /// None of the client keys (401).
    Unauthorized,
    /// A body over `max_body_bytes` (413).
    BodyTooLarge,
    /// A body that paused longer than `header_timeout_s` (408).
    BodyTimedOut,
}

impl Refusal {
    /// Every reason, in `/metrics` order.
    pub const ALL: [Refusal; 6] = [
        Refusal::MaxConnections,
        Refusal::HeaderTimeout,
        Refusal::HeadTooLarge,
        Refusal::Unauthorized,
        Refusal::BodyTooLarge,
        Refusal::BodyTimedOut,
    ];

    /// Its `reason` label on `dynamollm_router_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::Unauthorized => "unauthorized",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::BodyTimedOut => "body_timeout",
        }
    }
}

/// Count a refusal in the status (`router`) and on `/metrics`.
pub fn count_refusal(shared: &Shared, why: Refusal) {
    if let Ok(mut r) = shared.router_stats.lock() {
        let n = match why {
            Refusal::MaxConnections => &mut r.connections_refused,
            Refusal::HeaderTimeout => &mut r.connections_timed_out,
            Refusal::HeadTooLarge => &mut r.heads_too_large,
            Refusal::Unauthorized => &mut r.unauthorized,
            Refusal::BodyTooLarge => &mut r.bodies_too_large,
            Refusal::BodyTimedOut => &mut r.bodies_timed_out,
        };
        *n += 1;
    }
    shared.metrics.observe_router_refused(why.label());
}

/// The limits on the router's connections, from `[router]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// A whole request head within this of opening, or of the previous answer.
    pub header_timeout: Duration,
    /// The largest request head (bytes).
    pub max_header_bytes: usize,
}

impl ConnLimits {
    /// From `[router]`, `max_connections` fitted to the soft open-files limit.
    pub fn from_config(r: &RouterSection, open_files: Option<u64>) -> ConnLimits {
        let max_connections = fit_to_descriptors(r.max_connections, open_files);
        if (max_connections as u64) < u64::from(r.max_connections) {
            tracing::warn!(
                configured = r.max_connections,
                max_connections,
                open_files,
                "router.max_connections lowered to fit the open-files limit \
                 ({DESCRIPTORS_PER_CONNECTION} descriptors a connection, {RESERVED_DESCRIPTORS} kept for the rest); \
                 raise the limit (systemd: LimitNOFILE) to hold more"
            );
        }
        ConnLimits {
            max_connections,
            header_timeout: Duration::from_secs_f64(r.header_timeout_s),
            max_header_bytes: r.max_header_bytes as usize,
        }
    }
}

/// `max_connections`, lowered where the soft open-files limit could not hold
/// that many connections ([`DESCRIPTORS_PER_CONNECTION`] each) and still leave
/// [`RESERVED_DESCRIPTORS`] to the rest of the service; at least 1.
pub fn fit_to_descriptors(max_connections: u32, open_files: Option<u64>) -> usize {
    let fits = open_files.map_or(u64::MAX, |n| n.saturating_sub(RESERVED_DESCRIPTORS) / DESCRIPTORS_PER_CONNECTION);
    u64::from(max_connections).min(fits).max(1) as usize
}

/// The count of open connections, one less when it drops.
struct Open(Arc<Shared>);

impl Open {
    fn new(shared: Arc<Shared>) -> Open {
        shared.router_stats.lock().map(|mut r| r.connections += 1).ok();
        Open(shared)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.router_stats.lock().map(|mut r| r.connections = r.connections.saturating_sub(1)).ok();
    }
}

/// Whether an accept error concerns one connection only (it went away before
/// it was accepted): the next accept may proceed at once.
fn one_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock)
}

/// Serve `app` to the clients of `listener` within `limits`; runs until the
/// task is dropped.
pub async fn serve(listener: TcpListener, app: axum::Router, limits: ConnLimits, shared: Arc<Shared>) {
    for r in Refusal::ALL {
        shared.metrics.observe_router_refused_zero(r.label());
    }
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let service = TowerToHyperService::new(app);
    let (mut refused, mut refused_logged_at) = (0u64, None::<Instant>);
    let mut error_logged_at = None::<Instant>;
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) if one_connection(&e) => continue,
            Err(e) => {
                // Out of descriptors (or memory): the connection waits in the backlog; try again shortly.
                if error_logged_at.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    tracing::error!("router: cannot accept a connection: {e}");
                    error_logged_at = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(tcp);
            count_refusal(&shared, Refusal::MaxConnections);
            refused += 1;
            if refused_logged_at.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                tracing::warn!(
                    refused,
                    max_connections = limits.max_connections,
                    "router: connections closed as soon as accepted: router.max_connections were open"
                );
                refused_logged_at = Some(Instant::now());
                refused = 0;
            }
            continue;
        };
        // Tokens go out one small write at a time: without TCP_NODELAY, Nagle holds each
        // until the client acknowledges the previous one (delayed ACKs add tens of ms).
        let _ = tcp.set_nodelay(true);
        let (service, open) = (service.clone(), Open::new(shared.clone()));
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_header_size(limits.max_header_bytes);
            if let Err(e) = http.serve_connection(TokioIo::new(tcp), service).await {
                if e.is_timeout() {
                    count_refusal(&open.0, Refusal::HeaderTimeout);
                } else if e.is_parse_too_large() {
                    count_refusal(&open.0, Refusal::HeadTooLarge);
                }
            }
            drop(open);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_fits_the_open_files_limit() {
        assert_eq!(fit_to_descriptors(1024, Some(65_536)), 1024);
        assert_eq!(fit_to_descriptors(1024, None), 1024);
        assert_eq!(fit_to_descriptors(1024, Some(1024)), 256);
        assert_eq!(fit_to_descriptors(1024, Some(100)), 1);
        assert_eq!(fit_to_descriptors(1024, Some(u64::MAX)), 1024);
    }
}
