//! Connecting to an etcd group the same way in every tern process: keep-alives
//! so a dead member is noticed, and retries at start-up because a process may
//! start before its group. And reading a large range the same way
//! everywhere: in pages at one revision, because a single range response
//! over gRPC's 4 MiB message limit fails whatever the client asks for.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, GetResponse};

use crate::CommonError;

/// A client of the etcd members at `endpoints`: over TLS with `tls`'s
/// certificate (which etcd's `--client-cert-auth` requires) when given,
/// plain otherwise. Every tern process dials etcd through here, so that a
/// TLS deployment has no plain-text link left over. Connect timeout and
/// keep-alives are tern's usual ones (2 s; 10 s and 5 s) either way;
/// `call_timeout` bounds every call.
pub async fn client(
    endpoints: &[impl AsRef<str>],
    tls: Option<&crate::tls::Tls>,
    call_timeout: Option<Duration>,
) -> Result<Client, etcd_client::Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let Some(t) = call_timeout {
        options = options.with_timeout(t);
    }
    match tls {
        None => Client::connect(endpoints, Some(options)).await,
        Some(tls) => {
            let urls: Vec<String> = endpoints.iter().map(|e| e.as_ref().to_string()).collect();
            let channel = crate::tls::etcd_channel(&urls, tls, call_timeout)
                .map_err(|e| etcd_client::Error::InvalidArgs(e.to_string()))?;
            Client::from_channel(channel, Some(options)).await
        }
    }
}

/// Connects to `endpoints` (over TLS when `tls` is given) and waits until
/// one answers a status call, or `deadline` passes. `what` names the group
/// in the error.
pub async fn connect_tls(
    endpoints: &[String],
    tls: Option<&crate::tls::Tls>,
    what: &str,
    deadline: Duration,
) -> Result<Client, CommonError> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let error = match client(endpoints, tls, None).await {
            Ok(mut c) => match c.status().await {
                Ok(_) => return Ok(c),
                Err(source) => CommonError::EtcdUnanswered {
                    what: what.to_string(),
                    endpoints: endpoints.join(","),
                    source,
                },
            },
            Err(source) => CommonError::EtcdConnect {
                what: what.to_string(),
                endpoints: endpoints.join(","),
                source,
            },
        };
        if tokio::time::Instant::now() > until {
            return Err(error);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The largest watch response tern's watches accept. etcd batches up to
/// 1,000 revisions into one response while a watch catches up, and one
/// revision can be large on its own (a lease expiring a million records),
/// so gRPC's default 4 MiB would wedge a watch that fell behind: it would
/// fail on the same response at every retry. Only what arrives is
/// allocated, so the limit costs nothing until a response is that large.
pub const WATCH_MESSAGE_LIMIT: usize = 1 << 30;

/// The size a page of [`Pages`] aims at, in key and value bytes.
pub const PAGE_BYTES: usize = 4 << 20;
/// The largest page response [`Pages`] accepts.
pub const PAGE_MESSAGE_LIMIT: usize = 64 << 20;
/// The most keys [`Pages`] asks for in one page.
const PAGE_KEYS_MAX: i64 = 100_000;

/// A key range read in pages, every page at the revision of the first, so
/// the pages together are one consistent snapshot and a watch started at
/// [`Pages::revision`]` + 1` misses nothing.
///
/// Pages are sized by bytes, not by a fixed key count: etcd answers a range
/// with a limit after visiting every key to the end of the range (to count
/// them), so reading N keys in pages of k costs it N²/k visits; a million
/// placement records in pages of 5,000 took 16 s, nearly all of it
/// counting. The key count doubles while pages come back under half of
/// [`PAGE_BYTES`] and halves over twice that; a page over
/// [`PAGE_MESSAGE_LIMIT`] (large values) is asked again with a quarter of
/// the keys.
pub struct Pages {
    from: Vec<u8>,
    end: Vec<u8>,
    limit: i64,
    revision: Option<i64>,
    done: bool,
}

impl Pages {
    /// The keys in `[from, end)`, `limit` keys in the first page.
    pub fn range(from: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>, limit: i64) -> Self {
        Self {
            from: from.into(),
            end: end.into(),
            limit: limit.max(1),
            revision: None,
            done: false,
        }
    }

    /// Every key under `prefix`.
    pub fn prefix(prefix: &str, limit: i64) -> Self {
        let mut end = prefix.as_bytes().to_vec();
        // The first key after every key that starts with the prefix (tern's
        // prefixes end in '/', never in 0xff).
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        Self::range(prefix, end, limit)
    }

    /// The revision every page was read at, once the first page is in.
    pub fn revision(&self) -> Option<i64> {
        self.revision
    }

    /// The next page; `None` after the last.
    pub async fn next(&mut self, client: &mut Client) -> Result<Option<GetResponse>, etcd_client::Error> {
        if self.done {
            return Ok(None);
        }
        loop {
            let mut options = GetOptions::new().with_range(self.end.clone()).with_limit(self.limit);
            if let Some(r) = self.revision {
                options = options.with_revision(r);
            }
            let mut kv = client.kv_client().max_decoding_message_size(PAGE_MESSAGE_LIMIT);
            let page = match kv.get(self.from.clone(), Some(options)).await {
                Ok(page) => page,
                Err(etcd_client::Error::GRpcStatus(s))
                    if matches!(s.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted)
                        && self.limit > 1 =>
                {
                    self.limit = (self.limit / 4).max(1);
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.revision
                .get_or_insert(page.header().map(|h| h.revision()).unwrap_or(0));
            let bytes: usize = page.kvs().iter().map(|kv| kv.key().len() + kv.value().len()).sum();
            if bytes < PAGE_BYTES / 2 {
                self.limit = (self.limit * 2).min(PAGE_KEYS_MAX);
            } else if bytes > PAGE_BYTES * 2 {
                self.limit = (self.limit / 2).max(1);
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    self.from = last.key().to_vec();
                    self.from.push(0);
                }
                _ => self.done = true,
            }
            return Ok(Some(page));
        }
    }
}
