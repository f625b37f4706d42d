//! [`EtcdStore`]: the registry on an etcd v3 cluster (feature `etcd`).
//!
//! [`Store`] was shaped after etcd, so this is a translation: `put` is a Put,
//! `compare_and_put` a one-compare Txn on `mod_revision` (or `version == 0` for
//! "must not exist"), leases are etcd leases, and a watch is an etcd watch on the
//! prefix. What this module adds is a blocking face and resumption: calls run on a
//! small private tokio runtime and block the calling thread (the agent is a
//! std-thread event loop), and a watch whose stream breaks — a member restarted, a
//! connection reset — is opened again from the revision after the last event it
//! delivered, so the consumer sees no gap and no repeat. Only compaction ends a
//! watch ([`StoreError::Compacted`]), exactly as with etcd itself.
//!
//! Must not be called from inside a tokio runtime: blocking there would panic.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::runtime::Runtime;
use tonic::Code;

use crate::store::check_key;
use crate::{
    EtcdOptions, Event, KeyValue, LeaseId, Revision, Store, StoreError, Watch, WatchBatch,
    WatchSender,
};

/// A connection to an etcd cluster. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    runtime: Arc<Runtime>,
    client: Client,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

/// First and longest pause between attempts to re-open a broken watch.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(2);
/// How often a quiet watch task checks whether its consumer has gone.
const WATCH_CLOSED_CHECK: Duration = Duration::from_millis(500);

impl EtcdStore {
    /// Connects to the cluster through `endpoints` (`http://host:2379`, or
    /// `https://` with [`EtcdOptions::tls`]). Requests are balanced over the
    /// endpoints, and a member that goes away is routed around (requests that cannot reach a member are retried, see `call`).
    pub fn connect<E: AsRef<str>>(
        endpoints: &[E],
        options: EtcdOptions,
    ) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::InvalidArgument(
                "no etcd endpoints given".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            // One worker is plenty for an agent's traffic, and keeps the machine quiet.
            .worker_threads(1)
            .thread_name("registry-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable {
                reason: format!("cannot start the etcd client runtime: {e}"),
            })?;
        let mut connect = ConnectOptions::new()
            .with_timeout(options.request_timeout)
            .with_connect_timeout(options.connect_timeout)
            // Find dead connections under a watch, which has no requests to time out.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            // A member cut off from the leader must not serve stale reads or watches.
            .with_require_leader(true);
        if let Some((name, password)) = &options.user {
            connect = connect
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &options.tls {
            let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            connect = connect.with_tls(config);
        }
        let client = runtime
            .block_on(Client::connect(endpoints, Some(connect)))
            .map_err(|e| map_error(e, None))?;
        Ok(EtcdStore {
            runtime: Arc::new(runtime),
            client,
        })
    }

    /// Runs one request on the runtime with a fresh handle on the shared client.
    /// `lease` is the lease the request names, for a precise `LeaseNotFound`.
    ///
    /// A request that could not reach a member is tried again a few times: the
    /// client's balancer keeps a dead member in rotation (grpc-rust#2839), so the
    /// next attempt usually lands on a live one. Retrying is safe here because every
    /// caller tolerates a repeat (puts overwrite, a compare-and-put that did land
    /// reads back as the caller's own value).
    fn call<T, F>(
        &self,
        lease: Option<LeaseId>,
        request: impl Fn(Client) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        const ATTEMPTS: usize = 4;
        let mut attempt = 1;
        loop {
            match self
                .runtime
                .block_on(request(self.client.clone()))
                .map_err(|e| map_error(e, lease))
            {
                Err(StoreError::Unavailable { reason }) if attempt < ATTEMPTS => {
                    tracing::debug!(attempt, "etcd unavailable ({reason}); trying again");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let response = self.call(None, |mut c| async move { c.get(key, None).await })?;
        Ok(response.kvs().iter().find_map(key_value))
    }

    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let response = self.call(None, |mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        let revision = header_revision(response.header());
        Ok((
            response.kvs().iter().filter_map(key_value).collect(),
            revision,
        ))
    }

    fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        check_key(key)?;
        let response = self.call(lease, |mut c| async move {
            c.put(key, value, put_options(lease)).await
        })?;
        Ok(header_revision(response.header()))
    }

    fn compare_and_put(
        &self,
        key: &str,
        expected: Option<Revision>,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError> {
        check_key(key)?;
        let compare = match expected {
            None => Compare::version(key, CompareOp::Equal, 0),
            // etcd gives a missing key mod_revision 0; no stored key has it.
            Some(0) => return Ok(false),
            Some(revision) => {
                let revision = i64::try_from(revision).map_err(|_| {
                    StoreError::InvalidArgument(format!("revision {revision} is out of range"))
                })?;
                Compare::mod_revision(key, CompareOp::Equal, revision)
            }
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, value, put_options(lease))]);
        let response = self.call(lease, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        Ok(response.succeeded())
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let response = self.call(None, |mut c| async move { c.delete(key, None).await })?;
        Ok(response.deleted() > 0)
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidArgument(
                "lease ttl must not be zero".into(),
            ));
        }
        // etcd counts whole seconds: round up, so a lease never ends early.
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = i64::try_from(seconds).unwrap_or(i64::MAX);
        let response = self.call(
            None,
            |mut c| async move { c.lease_grant(seconds, None).await },
        )?;
        if !response.error().is_empty() {
            return Err(StoreError::Refused {
                reason: format!("lease grant: {}", response.error()),
            });
        }
        Ok(LeaseId(response.id()))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        // Opening the keep-alive stream sends one keep-alive and checks its answer
        // (TTL 0: the lease is gone); that single round trip is all we need.
        self.call(Some(lease), |mut c| async move {
            c.lease_keep_alive(lease.0).await.map(drop)
        })
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.call(Some(lease), |mut c| async move {
            c.lease_revoke(lease.0).await.map(drop)
        })
    }

    fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        let (tx, watch) = Watch::channel();
        self.runtime
            .spawn(follow(self.client.clone(), prefix.to_owned(), after, tx));
        // The task runs on this handle's runtime: keep it for as long as the watch.
        Ok(watch.holding(self.runtime.clone()))
    }
}

/// The watch task: keeps an etcd watch open from the revision after the last
/// delivered event, re-opening it whenever the stream breaks.
async fn follow(mut client: Client, prefix: String, after: Revision, tx: WatchSender) {
    let mut delivered = after;
    let mut retry = WATCH_RETRY_MIN;
    while !tx.is_closed() {
        let start = i64::try_from(delivered.saturating_add(1)).unwrap_or(i64::MAX);
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_progress_notify();
        match client.watch(prefix.as_str(), Some(options)).await {
            Ok(mut stream) => {
                if relay(&mut stream, &mut delivered, &mut retry, &tx).await == Relay::Stop {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "registry watch: cannot open; retrying"),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(WATCH_RETRY_MAX);
    }
}

#[derive(PartialEq, Eq)]
enum Relay {
    /// The consumer is gone or the watch ended for good.
    Stop,
    /// The stream broke: open another from `delivered`.
    Reopen,
}

/// Sends one stream's events on until it breaks, advancing `delivered` and
/// resetting `retry` while it works.
async fn relay(
    stream: &mut etcd_client::WatchStream,
    delivered: &mut Revision,
    retry: &mut Duration,
    tx: &WatchSender,
) -> Relay {
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            () = tokio::time::sleep(WATCH_CLOSED_CHECK) => {
                if tx.is_closed() {
                    return Relay::Stop;
                }
                continue;
            }
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => {
                tracing::debug!("registry watch: stream ended; re-opening");
                return Relay::Reopen;
            }
            Err(e) => {
                tracing::debug!(error = %e, "registry watch: stream failed; re-opening");
                return Relay::Reopen;
            }
        };
        if response.canceled() {
            if response.compact_revision() > 0 {
                // etcd keeps history from compact_revision on; below it is gone.
                let compacted = u64::try_from(response.compact_revision() - 1).unwrap_or_default();
                tx.send(Err(StoreError::Compacted {
                    requested: *delivered,
                    compacted,
                }));
                return Relay::Stop;
            }
            // Canceled for another reason (lost leader, say): open it again.
            tracing::debug!(
                reason = response.cancel_reason(),
                "registry watch: canceled; re-opening"
            );
            return Relay::Reopen;
        }
        *retry = WATCH_RETRY_MIN;
        let events: Vec<Event> = response
            .events()
            .iter()
            .filter_map(event)
            // A re-opened watch starts after `delivered`; this only guards it.
            .filter(|e| e.mod_revision() > *delivered)
            .collect();
        let Some(last) = events.last().map(Event::mod_revision) else {
            continue;
        };
        *delivered = last;
        let revision = header_revision(response.header()).max(last);
        if !tx.send(Ok(WatchBatch { revision, events })) {
            return Relay::Stop;
        }
    }
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l.0))
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header
        .and_then(|h| u64::try_from(h.revision()).ok())
        .unwrap_or_default()
}

/// Our keys are UTF-8; a key that is not was written by someone else and is
/// skipped with a warning rather than failing the whole listing or watch.
fn key_value(kv: &etcd_client::KeyValue) -> Option<KeyValue> {
    let Ok(key) = kv.key_str() else {
        tracing::warn!(key = ?String::from_utf8_lossy(kv.key()), "registry: skipping a key that is not UTF-8");
        return None;
    };
    Some(KeyValue {
        key: key.to_owned(),
        value: kv.value().to_vec(),
        mod_revision: u64::try_from(kv.mod_revision()).unwrap_or_default(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

fn event(e: &etcd_client::Event) -> Option<Event> {
    let kv = key_value(e.kv()?)?;
    Some(match e.event_type() {
        etcd_client::EventType::Put => Event::Put(kv),
        etcd_client::EventType::Delete => Event::Delete {
            key: kv.key,
            mod_revision: kv.mod_revision,
        },
    })
}

/// Sorts etcd's errors into what a caller can act on. `lease` is the lease the
/// request named, so "lease not found" can say which.
fn map_error(e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => {
            let reason = status.message().to_owned();
            match (status.code(), lease) {
                (Code::NotFound, Some(lease)) if reason.contains("lease not found") => {
                    StoreError::LeaseNotFound(lease)
                }
                // etcd reports failed or missing credentials as invalid arguments.
                (Code::InvalidArgument, _)
                    if reason.contains("authentication failed")
                        || reason.contains("user name is empty") =>
                {
                    StoreError::Refused { reason }
                }
                (Code::InvalidArgument | Code::OutOfRange, _) => {
                    StoreError::InvalidArgument(reason)
                }
                (Code::Unauthenticated | Code::PermissionDenied | Code::FailedPrecondition, _) => {
                    StoreError::Refused { reason }
                }
                _ => StoreError::Unavailable {
                    reason: format!("etcd: {}", status),
                },
            }
        }
        E::LeaseKeepAliveError(reason) => match lease {
            Some(lease) if reason.contains("lease not found") => StoreError::LeaseNotFound(lease),
            _ => StoreError::Unavailable {
                reason: format!("etcd lease keep-alive: {reason}"),
            },
        },
        E::InvalidArgs(reason) => StoreError::InvalidArgument(reason),
        E::InvalidUri(e) => StoreError::InvalidArgument(format!("etcd endpoint: {e}")),
        other => StoreError::Unavailable {
            reason: format!("etcd: {other}"),
        },
    }
}
