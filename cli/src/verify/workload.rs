//! The workload of `tern verify`: clients that each hold their own
//! connection to their region's router and run a random mix of operations on
//! every account's keys, recording each as invoke/complete with what they
//! were told; and the final round after healing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_api::pb;
use tern_local::LocalDeployment;
use tern_verify::{History, Outcome, Record, Request};

use super::{BOUND_MS, DEADLINE, KEYS};
use crate::CliError;

/// The operations of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Put,
    Cas,
    Delete,
    Get,
    Bounded,
}

/// How often each operation is drawn (weights, `--mix`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: [(Kind, u32); 5],
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            weights: [
                (Kind::Put, 30),
                (Kind::Cas, 20),
                (Kind::Delete, 10),
                (Kind::Get, 20),
                (Kind::Bounded, 20),
            ],
        }
    }
}

impl Mix {
    const NAMES: [(&'static str, Kind); 5] = [
        ("put", Kind::Put),
        ("cas", Kind::Cas),
        ("delete", Kind::Delete),
        ("get", Kind::Get),
        ("bounded", Kind::Bounded),
    ];

    /// `put=30,cas=20,...`: names not given weigh 0.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut weights = Self::NAMES.map(|(_, k)| (k, 0));
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not NAME=WEIGHT"))?;
            let i = Self::NAMES
                .iter()
                .position(|(n, _)| *n == name)
                .ok_or_else(|| format!("`{name}` is no operation; use put, cas, delete, get and bounded"))?;
            weights[i].1 = weight
                .parse()
                .map_err(|_| format!("`{weight}` (weight of {name}) is not a whole number"))?;
        }
        if weights.iter().all(|(_, w)| *w == 0) {
            return Err("the mix weighs nothing: give at least one operation a weight".into());
        }
        Ok(Self { weights })
    }

    /// The same without deletes: runs that lose a region match the writes
    /// its successor never had to the history by their values, and a
    /// delete has none.
    pub fn without_deletes(&self) -> Self {
        let mut weights = self.weights;
        for (k, w) in weights.iter_mut() {
            if *k == Kind::Delete {
                *w = 0;
            }
        }
        if weights.iter().all(|(_, w)| *w == 0) {
            weights[0].1 = 1;
        }
        Self { weights }
    }

    fn total(&self) -> u32 {
        self.weights.iter().map(|(_, w)| w).sum()
    }

    fn pick(&self, mut draw: u32) -> Kind {
        for (kind, weight) in self.weights {
            if draw < weight {
                return kind;
            }
            draw -= weight;
        }
        Kind::Get
    }
}

/// What a client was told, as the history records it. A status the router
/// sent says what happened by its code (UNKNOWN: it cannot tell). A status
/// made by the client's transport (it has a source: the link, the
/// connection) is a definite failure only when the request never left:
/// the router's own rule for its forwarded calls, `classify`. A router
/// killed or a link cut after sending leaves the write's outcome unknown.
pub fn outcome(status: Option<&tonic::Status>, cas: bool) -> Outcome {
    use tonic::Code::*;
    let Some(status) = status else {
        return Outcome::Ok {
            value: None,
            swapped: cas.then_some(true),
            staleness_ms: None,
        };
    };
    let code = status.code();
    let from_link = std::error::Error::source(status).is_some();
    if from_link {
        return match tern_api::delivery::classify(status) {
            tern_api::delivery::Delivery::NotSent => Outcome::Failed {
                reason: format!("{code:?}, not sent: {}", status.message()),
            },
            _ => Outcome::Indeterminate {
                reason: format!("{code:?} from the link: {}", status.message()),
            },
        };
    }
    match code {
        FailedPrecondition if cas => Outcome::Ok {
            value: None,
            swapped: Some(false),
            staleness_ms: None,
        },
        Unknown | DeadlineExceeded | Cancelled => Outcome::Indeterminate {
            reason: format!("{code:?}: {}", status.message()),
        },
        _ => Outcome::Failed {
            reason: format!("{code:?}: {}", status.message()),
        },
    }
}

pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(DEADLINE);
    r
}

/// One client: a random mix of operations on every account's keys until
/// `until`, at most one per `pause`. An idempotent write whose outcome is
/// unknown is retried with the same key, as a client should.
#[allow(clippy::too_many_arguments)]
pub async fn client(
    id: u32,
    mut c: tern_api::RouterClient,
    accounts: Vec<String>,
    seed: u64,
    started: Instant,
    until: Instant,
    pause: Duration,
    mix: Mix,
    records: Arc<Mutex<Vec<Record>>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let us = || started.elapsed().as_micros() as u64;
    // What this client last knew each key to hold: what a CAS expects.
    let mut known: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut n = 0u64;
    while Instant::now() < until {
        let account = &accounts[rng.random_range(0..accounts.len())];
        let key = format!("k{}", rng.random_range(0..KEYS));
        let full = format!("{account}/{key}");
        let value = format!("c{id}-{n}");
        n += 1;
        let idem = rng.random_bool(0.5).then(|| format!("c{id}-{n}"));
        let kind = mix.pick(rng.random_range(0..mix.total()));
        let mut attempts = if idem.is_some() { 3 } else { 1 };
        loop {
            attempts -= 1;
            let invoke_us = us();
            let (req, out) = match kind {
                Kind::Put => {
                    let r = c
                        .put(request(pb::PutRequest {
                            account: account.clone(),
                            key: key.clone(),
                            value: value.clone().into_bytes(),
                            idempotency_key: idem.clone().unwrap_or_default(),
                        }))
                        .await;
                    (Request::Put { value: value.clone() }, outcome(r.err().as_ref(), false))
                }
                Kind::Cas => {
                    let expect = known.get(&full).cloned().flatten();
                    let compare = match &expect {
                        Some(v) => pb::Compare {
                            key: key.clone(),
                            target: pb::compare::Target::Value as i32,
                            op: pb::compare::Op::Equal as i32,
                            value: v.clone().into_bytes(),
                            number: 0,
                        },
                        None => pb::Compare {
                            key: key.clone(),
                            target: pb::compare::Target::Version as i32,
                            op: pb::compare::Op::Equal as i32,
                            value: vec![],
                            number: 0,
                        },
                    };
                    let r = c
                        .txn(request(pb::TxnRequest {
                            account: account.clone(),
                            compares: vec![compare],
                            ops: vec![pb::Operation {
                                op: Some(pb::operation::Op::Put(pb::PutOp {
                                    key: key.clone(),
                                    value: value.clone().into_bytes(),
                                })),
                            }],
                            idempotency_key: idem.clone().unwrap_or_default(),
                        }))
                        .await;
                    (
                        Request::Cas {
                            expect,
                            new: Some(value.clone()),
                        },
                        outcome(r.err().as_ref(), true),
                    )
                }
                Kind::Delete => {
                    let r = c
                        .delete(request(pb::DeleteRequest {
                            account: account.clone(),
                            key: key.clone(),
                            idempotency_key: idem.clone().unwrap_or_default(),
                        }))
                        .await;
                    (Request::Delete, outcome(r.err().as_ref(), false))
                }
                Kind::Get => {
                    let r = c
                        .get(request(pb::GetRequest {
                            account: account.clone(),
                            key: key.clone(),
                            read: None,
                        }))
                        .await;
                    let out = match r {
                        Ok(r) => {
                            let r = r.into_inner();
                            Outcome::Ok {
                                value: r.found.then(|| String::from_utf8_lossy(&r.value).into_owned()),
                                swapped: None,
                                staleness_ms: None,
                            }
                        }
                        Err(e) => Outcome::Failed {
                            reason: format!("{:?}", e.code()),
                        },
                    };
                    (Request::Get, out)
                }
                Kind::Bounded => {
                    let r = c
                        .get(request(pb::GetRequest {
                            account: account.clone(),
                            key: key.clone(),
                            read: Some(pb::ReadOptions {
                                consistency: pb::Consistency::Bounded as i32,
                                max_staleness_ms: BOUND_MS,
                            }),
                        }))
                        .await;
                    let out = match r {
                        Ok(r) => {
                            let r = r.into_inner();
                            let meta = r.meta.unwrap_or_default();
                            Outcome::Ok {
                                value: r.found.then(|| String::from_utf8_lossy(&r.value).into_owned()),
                                swapped: None,
                                staleness_ms: meta.from_mirror.then_some(u64::from(meta.staleness_ms)),
                            }
                        }
                        Err(e) => Outcome::Failed {
                            reason: format!("{:?}", e.code()),
                        },
                    };
                    (
                        Request::GetBounded {
                            max_staleness_ms: u64::from(BOUND_MS),
                        },
                        out,
                    )
                }
            };
            // What the key holds now, as far as this client can tell.
            match (&req, &out) {
                (Request::Get, Outcome::Ok { value, .. }) => {
                    known.insert(full.clone(), value.clone());
                }
                (Request::Put { value } | Request::Cas { new: Some(value), .. }, Outcome::Ok { swapped, .. })
                    if *swapped != Some(false) =>
                {
                    known.insert(full.clone(), Some(value.clone()));
                }
                (Request::Delete, Outcome::Ok { .. }) => {
                    known.insert(full.clone(), None);
                }
                (_, Outcome::Indeterminate { .. }) => {
                    known.remove(&full);
                }
                _ => {}
            }
            let unknown = matches!(out, Outcome::Indeterminate { .. });
            records.lock().unwrap_or_else(|e| e.into_inner()).push(Record {
                client: id,
                key: full.clone(),
                invoke_us,
                complete_us: us(),
                request: req,
                outcome: out,
                idempotency_key: idem.clone(),
            });
            if !(unknown && attempts > 0 && Instant::now() < until) {
                break;
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// After healing: one write per account through its home region (it must
/// succeed within 30 s) and a strong read of every key, recorded.
pub async fn final_round(
    d: &LocalDeployment,
    accounts: &[(String, &str)],
    started: Instant,
    history: &mut History,
) -> Result<(), CliError> {
    let us = || started.elapsed().as_micros() as u64;
    for (account, home) in accounts {
        let mut c = d.client(home).await;
        let value = format!("final-{account}");
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            let invoke_us = us();
            let r = c
                .put(request(pb::PutRequest {
                    account: account.clone(),
                    key: "k0".into(),
                    value: value.clone().into_bytes(),
                    idempotency_key: format!("final-{account}"),
                }))
                .await;
            history.records.push(Record {
                client: u32::MAX,
                key: format!("{account}/k0"),
                invoke_us,
                complete_us: us(),
                request: Request::Put { value: value.clone() },
                outcome: outcome(r.as_ref().err(), false),
                idempotency_key: Some(format!("final-{account}")),
            });
            if r.is_ok() {
                break;
            }
            if Instant::now() > give_up {
                let why = r
                    .err()
                    .map(|e| format!("{:?}: {}", e.code(), e.message()))
                    .unwrap_or_default();
                return Err(CliError::Setup(format!(
                    "the final write to {account} did not succeed within 30 s of healing: {why}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for k in 0..KEYS {
            let key = format!("k{k}");
            let invoke_us = us();
            let r = c
                .get(request(pb::GetRequest {
                    account: account.clone(),
                    key: key.clone(),
                    read: None,
                }))
                .await?
                .into_inner();
            history.records.push(Record {
                client: u32::MAX,
                key: format!("{account}/{key}"),
                invoke_us,
                complete_us: us(),
                request: Request::Get,
                outcome: Outcome::Ok {
                    value: r.found.then(|| String::from_utf8_lossy(&r.value).into_owned()),
                    swapped: None,
                    staleness_ms: None,
                },
                idempotency_key: None,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_pick_by_weight() {
        let mix = Mix::parse("put=1,bounded=3").expect("valid");
        assert_eq!(mix.total(), 4);
        assert_eq!(mix.pick(0), Kind::Put);
        assert_eq!(mix.pick(1), Kind::Bounded);
        assert_eq!(mix.pick(3), Kind::Bounded);
        assert_eq!(Mix::default().total(), 100);
        for (bad, says) in [
            ("put", "NAME=WEIGHT"),
            ("read=3", "`read` is no operation"),
            ("put=x", "not a whole number"),
            ("put=0", "weighs nothing"),
        ] {
            let e = Mix::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
