//! Requests as the router runs them: each gRPC request is parsed once into a
//! validated `Op` (an INVALID_ARGUMENT names the field and the rule), in
//! tern's terms: the account, what to do in its keys (`store::Work`), the
//! idempotency key and the fingerprint that ties that key to this request.

use ring::digest;
use tern_common::{AccountId, IdempotencyKey, UserKey, check_value, data_key, data_prefix};

use crate::error::{Result, RouterError};
use crate::pb::{self, operation};
use crate::store::{Check, Record, Relation, Step, Target, Work};

/// Default and largest page of List.
pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;
/// Most compares and operations in one Txn (etcd allows 128 operations by
/// default; the fence and idempotency record take three).
pub const MAX_TXN_PARTS: usize = 100;

/// A request, validated.
#[derive(Clone, Debug)]
pub struct Op {
    pub account: AccountId,
    pub work: Work,
    /// With a key, a retry returns the first result and is applied once.
    pub idempotency: Option<IdempotencyKey>,
    /// What the idempotency record of this request says; a retry must match.
    pub record: Record,
    /// A BOUNDED read: the staleness it accepts, in ms.
    pub bounded_ms: Option<u64>,
}

impl Op {
    /// A write that could be applied twice if sent twice.
    pub fn unkeyed_write(&self) -> bool {
        self.work.writes() && self.idempotency.is_none()
    }

    /// Whether `found`, the record of an earlier request with this key, was
    /// written for this same request.
    pub fn check_replay(&self, found: &Record) -> Result<()> {
        if found.op == self.record.op && found.fp == self.record.fp {
            Ok(())
        } else {
            Err(RouterError::KeyReused)
        }
    }

    fn new(account: AccountId, work: Work, name: &str, idempotency: &str, fields: &[&[u8]]) -> Result<Self> {
        let idempotency = if idempotency.is_empty() {
            None
        } else {
            Some(IdempotencyKey::new(idempotency)?)
        };
        // Only a keyed request is ever compared with a record: the others
        // skip hashing their values.
        let fp = if idempotency.is_some() {
            fingerprint(name, fields)
        } else {
            String::new()
        };
        Ok(Self {
            account,
            work,
            idempotency,
            record: Record {
                op: name.into(),
                fp,
                existed: None,
                expires_ms: None,
            },
            bounded_ms: None,
        })
    }
}

/// A SHA-256 digest of the operation's name and fields, each preceded by
/// its length, so that two different requests can never share an encoding
/// (a separator byte could appear inside a value). Stored with the
/// idempotency record: a key reused for another request is refused instead
/// of answered with the wrong result.
pub fn fingerprint(name: &str, fields: &[&[u8]]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for field in std::iter::once(name.as_bytes()).chain(fields.iter().copied()) {
        ctx.update(&(field.len() as u64).to_be_bytes());
        ctx.update(field);
    }
    ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn user_key(account: &AccountId, key: &str) -> Result<String> {
    Ok(data_key(account, &UserKey::new(key)?))
}

fn bounded(read: &Option<pb::ReadOptions>) -> Option<u64> {
    match read {
        Some(r) if r.consistency == pb::Consistency::Bounded as i32 => Some(u64::from(r.max_staleness_ms)),
        _ => None,
    }
}

pub fn put(r: &pb::PutRequest) -> Result<Op> {
    let account = AccountId::new(&r.account)?;
    let key = user_key(&account, &r.key)?;
    check_value(&r.value)?;
    let fields = [key.as_bytes(), r.value.as_slice()];
    let work = Work::Put {
        key: key.clone(),
        value: r.value.clone(),
    };
    Op::new(account, work, "put", &r.idempotency_key, &fields)
}

pub fn delete(r: &pb::DeleteRequest) -> Result<Op> {
    let account = AccountId::new(&r.account)?;
    let key = user_key(&account, &r.key)?;
    let fields = [key.as_bytes()];
    Op::new(
        account,
        Work::Delete { key: key.clone() },
        "delete",
        &r.idempotency_key,
        &fields,
    )
}

pub fn get(r: &pb::GetRequest) -> Result<Op> {
    let account = AccountId::new(&r.account)?;
    let key = user_key(&account, &r.key)?;
    let mut op = Op::new(account, Work::Get { key }, "get", "", &[])?;
    op.bounded_ms = bounded(&r.read);
    Ok(op)
}

pub fn list(r: &pb::ListRequest) -> Result<Op> {
    let account = AccountId::new(&r.account)?;
    let prefix = UserKey::prefix(&r.prefix)?;
    let limit = page_limit(r.limit)?;
    let base = data_prefix(&account);
    let start = if r.page_token.is_empty() {
        format!("{base}{prefix}")
    } else {
        let after = UserKey::new(r.page_token.as_str())
            .map_err(|_| RouterError::BadRequest("page_token is malformed".into()))?;
        if !after.as_str().starts_with(prefix.as_str()) {
            return Err(RouterError::BadRequest(
                "page_token does not belong to this prefix".into(),
            ));
        }
        // The smallest key after the last one returned.
        format!("{base}{after}\u{0}")
    };
    let end = prefix_end(&format!("{base}{prefix}"));
    // One more than asked: tells whether another page exists.
    let work = Work::List {
        start,
        end,
        limit: i64::from(limit) + 1,
    };
    let mut op = Op::new(account, work, "list", "", &[])?;
    op.bounded_ms = bounded(&r.read);
    Ok(op)
}

/// The page size a List asks for (0: the default).
pub fn page_limit(limit: u32) -> Result<u32> {
    match limit {
        0 => Ok(DEFAULT_PAGE),
        n if n > MAX_PAGE => Err(RouterError::BadRequest(format!(
            "limit {n} is over the maximum of {MAX_PAGE}"
        ))),
        n => Ok(n),
    }
}

pub fn txn(r: &pb::TxnRequest) -> Result<Op> {
    let account = AccountId::new(&r.account)?;
    if r.compares.len() + r.ops.len() > MAX_TXN_PARTS {
        return Err(RouterError::BadRequest(format!(
            "a txn has at most {MAX_TXN_PARTS} compares and operations; this one has {}",
            r.compares.len() + r.ops.len()
        )));
    }
    if r.ops.is_empty() {
        return Err(RouterError::BadRequest("ops is empty".into()));
    }
    // The fingerprint's fields: every compare and operation, tagged.
    let mut fields: Vec<Vec<u8>> = Vec::new();
    let mut checks = Vec::new();
    for (i, c) in r.compares.iter().enumerate() {
        let key = user_key(&account, &c.key).map_err(|e| RouterError::BadRequest(format!("compares[{i}]: {e}")))?;
        let relation = match pb::compare::Op::try_from(c.op) {
            Ok(pb::compare::Op::Equal) => Relation::Equal,
            Ok(pb::compare::Op::NotEqual) => Relation::NotEqual,
            Ok(pb::compare::Op::Greater) => Relation::Greater,
            Ok(pb::compare::Op::Less) => Relation::Less,
            Err(_) => {
                return Err(RouterError::BadRequest(format!("compares[{i}].op {} is unknown", c.op)));
            }
        };
        let target = match pb::compare::Target::try_from(c.target) {
            Ok(pb::compare::Target::Value) => Target::Value(c.value.clone()),
            Ok(pb::compare::Target::Version) => Target::Version(c.number),
            Ok(pb::compare::Target::ModRevision) => Target::ModRevision(c.number),
            Err(_) => {
                return Err(RouterError::BadRequest(format!(
                    "compares[{i}].target {} is unknown",
                    c.target
                )));
            }
        };
        fields.push(b"compare".to_vec());
        fields.push(key.clone().into_bytes());
        fields.push(c.target.to_be_bytes().to_vec());
        fields.push(c.op.to_be_bytes().to_vec());
        fields.push(c.number.to_be_bytes().to_vec());
        fields.push(c.value.clone());
        checks.push(Check { key, relation, target });
    }
    let mut steps = Vec::new();
    // Keys written so far, by the index of the op that writes them: etcd
    // refuses a transaction that writes one key twice.
    let mut written: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, o) in r.ops.iter().enumerate() {
        let at = |e| RouterError::BadRequest(format!("ops[{i}]: {e}"));
        let step = match &o.op {
            Some(operation::Op::Put(put)) => {
                check_value(&put.value).map_err(at)?;
                let key =
                    user_key(&account, &put.key).map_err(|e| RouterError::BadRequest(format!("ops[{i}]: {e}")))?;
                fields.push(b"put".to_vec());
                fields.push(key.clone().into_bytes());
                fields.push(put.value.clone());
                Step::Put {
                    key,
                    value: put.value.clone(),
                }
            }
            Some(operation::Op::Delete(d)) => {
                let key = user_key(&account, &d.key).map_err(|e| RouterError::BadRequest(format!("ops[{i}]: {e}")))?;
                fields.push(b"delete".to_vec());
                fields.push(key.clone().into_bytes());
                Step::Delete { key }
            }
            Some(operation::Op::Get(g)) => {
                let key = user_key(&account, &g.key).map_err(|e| RouterError::BadRequest(format!("ops[{i}]: {e}")))?;
                fields.push(b"get".to_vec());
                fields.push(key.clone().into_bytes());
                Step::Get { key }
            }
            None => {
                return Err(RouterError::BadRequest(format!("ops[{i}] names no operation")));
            }
        };
        if let Step::Put { key, .. } | Step::Delete { key } = &step
            && let Some(first) = written.insert(key.clone(), i)
        {
            let user = key.rsplit_once("/d/").map_or(key.as_str(), |(_, k)| k);
            return Err(RouterError::BadRequest(format!(
                "ops[{i}] writes key `{user}`, which ops[{first}] already writes: a txn writes each key at most once"
            )));
        }
        steps.push(step);
    }
    let fields: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
    Op::new(account, Work::Txn { checks, steps }, "txn", &r.idempotency_key, &fields)
}

/// The first key after every key with `prefix` (etcd's range end).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/tern/a/x/d/"), b"/tern/a/x/d0".to_vec());
    }

    #[test]
    fn fingerprints_are_unambiguous() {
        assert_ne!(fingerprint("put", &[b"k", b"v1"]), fingerprint("put", &[b"k", b"v2"]));
        // A separator inside a value cannot make two requests alike.
        assert_ne!(fingerprint("put", &[b"ab", b"c"]), fingerprint("put", &[b"a", b"bc"]));
        assert_ne!(
            fingerprint("put", &[b"a\xff", b"b"]),
            fingerprint("put", &[b"a", b"\xffb"])
        );
        assert_ne!(fingerprint("put", &[b"k"]), fingerprint("delete", &[b"k"]));
        assert_eq!(fingerprint("put", &[b"k", b"v"]).len(), 64, "SHA-256 in hex");
    }

    fn put_op(key: &str) -> pb::Operation {
        pb::Operation {
            op: Some(operation::Op::Put(pb::PutOp {
                key: key.into(),
                value: b"v".to_vec(),
            })),
        }
    }

    #[test]
    fn a_txn_that_writes_a_key_twice_is_refused_naming_both_ops() {
        let r = pb::TxnRequest {
            account: "a".into(),
            compares: vec![],
            ops: vec![
                put_op("x"),
                put_op("y"),
                pb::Operation {
                    op: Some(operation::Op::Delete(pb::DeleteOp { key: "x".into() })),
                },
            ],
            idempotency_key: String::new(),
        };
        let e = txn(&r).expect_err("x twice").to_string();
        assert!(e.contains("ops[2]") && e.contains("ops[0]") && e.contains("`x`"), "{e}");
        // Reading a key it writes is fine.
        let r = pb::TxnRequest {
            ops: vec![
                put_op("x"),
                pb::Operation {
                    op: Some(operation::Op::Get(pb::GetOp { key: "x".into() })),
                },
            ],
            ..r
        };
        txn(&r).expect("a put and a get of one key");
    }

    #[test]
    fn the_same_request_has_the_same_fingerprint_and_a_different_one_does_not() {
        let a = put(&pb::PutRequest {
            account: "a".into(),
            key: "k".into(),
            value: b"1".to_vec(),
            idempotency_key: "op-1".into(),
        })
        .expect("valid");
        let same = a.clone();
        same.check_replay(&a.record).expect("a retry");
        let other = put(&pb::PutRequest {
            account: "a".into(),
            key: "k".into(),
            value: b"2".to_vec(),
            idempotency_key: "op-1".into(),
        })
        .expect("valid");
        assert!(matches!(other.check_replay(&a.record), Err(RouterError::KeyReused)));
    }
}
