//! Identifiers as newtypes, validated on construction, so that an unchecked
//! string can never become a key and a function taking (AccountId,
//! RegionName) cannot be called with its arguments swapped.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::InvalidInput;

/// Longest account id, in bytes (also the CRDs' limit, see `limits`).
pub const MAX_ACCOUNT_ID: usize = 128;
/// Longest user key, in bytes.
pub const MAX_USER_KEY: usize = 512;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;
/// Largest value, in bytes (etcd refuses requests over 1.5 MiB).
pub const MAX_VALUE: usize = 1024 * 1024;
/// Longest region name (it appears in Kubernetes object names; see
/// `limits::REGION_NAME_PATTERN` for the rest of the rule).
pub const MAX_REGION_NAME: usize = 20;

/// Rules shared by account ids, user keys and idempotency keys: they become
/// path segments of etcd keys, so they must not be able to leave their
/// account's prefix.
fn check_segment(field: &'static str, s: &str, max: usize) -> Result<(), InvalidInput> {
    if s.is_empty() {
        return Err(InvalidInput::Empty { field });
    }
    if s.len() > max {
        return Err(InvalidInput::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(InvalidInput::Forbidden {
            field,
            what: format!("control character U+{:04X}", c as u32),
            rule: "no control characters",
        });
    }
    if s.contains('/') {
        return Err(InvalidInput::Forbidden {
            field,
            what: "'/'".into(),
            rule: "no '/': it would leave the account's key prefix",
        });
    }
    if s.contains("..") {
        return Err(InvalidInput::Forbidden {
            field,
            what: "'..'".into(),
            rule: "no '..'",
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidInput;
            fn try_from(s: String) -> Result<Self, InvalidInput> {
                Self::new(s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidInput;
            fn from_str(s: &str) -> Result<Self, InvalidInput> {
                Self::new(s)
            }
        }
    };
}

string_id!(
    /// An account: letters, digits and `._:@-`, starting with a letter or
    /// digit, at most 128 bytes, no `..`.
    AccountId
);
string_id!(
    /// A user key inside an account: at most 512 bytes, no `/`, no `..`, no
    /// control characters.
    UserKey
);
string_id!(
    /// A client-chosen key that makes a write idempotent.
    IdempotencyKey
);
string_id!(
    /// A region: a DNS label of at most 20 characters.
    RegionName
);
string_id!(
    /// A migration: the name of its intent record in the directory. An
    /// AccountMigration's is `{namespace}.{name}.{uid}`, so one object is
    /// carried out once whichever cluster's operator sees it; the command
    /// line and the follow-the-sun policy choose their own.
    MigrationId
);

impl MigrationId {
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidInput> {
        check_name("migration", s.into(), MAX_ACCOUNT_ID * 2).map(Self)
    }
}

/// An account id's rules for `field`: a segment of at most `max` bytes of
/// letters, digits and `._:@-`, starting with a letter or digit.
fn check_name(field: &'static str, s: String, max: usize) -> Result<String, InvalidInput> {
    check_segment(field, &s, max)?;
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._:@-".contains(c);
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) || !s.chars().all(ok_char) {
        return Err(InvalidInput::Malformed {
            field,
            value: s,
            rule: "letters, digits and ._:@- only, starting with a letter or digit",
        });
    }
    Ok(s)
}

impl AccountId {
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidInput> {
        check_name("account", s.into(), MAX_ACCOUNT_ID).map(Self)
    }
}

impl UserKey {
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidInput> {
        let s = s.into();
        check_segment("key", &s, MAX_USER_KEY)?;
        Ok(Self(s))
    }

    /// A key prefix for List: may be empty (all keys), otherwise a key's rules.
    pub fn prefix(s: &str) -> Result<String, InvalidInput> {
        if s.is_empty() {
            return Ok(String::new());
        }
        check_segment("prefix", s, MAX_USER_KEY)?;
        Ok(s.to_string())
    }
}

impl IdempotencyKey {
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidInput> {
        let s = s.into();
        check_segment("idempotency_key", &s, MAX_IDEMPOTENCY_KEY)?;
        Ok(Self(s))
    }
}

impl RegionName {
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidInput> {
        let s = s.into();
        if crate::limits::is_region_name(&s) {
            Ok(Self(s))
        } else {
            Err(InvalidInput::Malformed {
                field: "region",
                value: s,
                rule: "a DNS label of at most 20 characters: lower-case letters, digits, '-'",
            })
        }
    }
}

/// Checks a value's size.
pub fn check_value(value: &[u8]) -> Result<(), InvalidInput> {
    if value.len() > MAX_VALUE {
        return Err(InvalidInput::TooLong {
            field: "value",
            len: value.len(),
            max: MAX_VALUE,
        });
    }
    Ok(())
}

/// An account's placement generation. It rises by one on every move, and
/// every write is guarded by it, so a write routed with a stale epoch cannot
/// commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An etcd revision of this region's own group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Revision(pub i64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A revision of another region's group, as its mirror here tracks it. A
/// type of its own: the two groups count independently, and comparing a
/// source revision with a local one is always a bug.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SourceRevision(pub i64);

impl SourceRevision {
    /// The revision after this one (where a watch resumes).
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }

    /// How many revisions `self` is ahead of `earlier` (0 when not ahead).
    pub fn since(self, earlier: Self) -> i64 {
        (self.0 - earlier.0).max(0)
    }
}

impl fmt::Display for SourceRevision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids() {
        for ok in ["acct-1", "a", "user@example.com", "org:42.x_y"] {
            AccountId::new(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, needle) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("a..b", "'..'"),
            ("-a", "starting with"),
            ("a b", "letters, digits"),
            ("a\u{7}", "control character"),
        ] {
            let err = AccountId::new(bad).expect_err(bad).to_string();
            assert!(err.contains("account") && err.contains(needle), "{bad:?}: {err}");
        }
        let long = "a".repeat(MAX_ACCOUNT_ID + 1);
        assert!(
            AccountId::new(long)
                .expect_err("too long")
                .to_string()
                .contains("limit is 128")
        );
    }

    #[test]
    fn keys_and_regions() {
        UserKey::new("balance:EUR").expect("valid");
        UserKey::new("ünïcode key").expect("unicode is fine");
        assert!(UserKey::new("../x").is_err());
        assert!(UserKey::new("x/y").is_err());
        assert!(UserKey::new("x\ny").is_err());
        RegionName::new("us-east").expect("valid");
        for bad in ["US", "us_east", "-x", "x-", "", "a-very-long-region-name-x"] {
            assert!(RegionName::new(bad).is_err(), "{bad}");
        }
        assert!(check_value(&vec![0; MAX_VALUE + 1]).is_err());
    }

    #[test]
    fn ids_refuse_bad_json() {
        assert!(serde_json::from_str::<AccountId>("\"a/b\"").is_err());
        assert_eq!(
            serde_json::from_str::<RegionName>("\"eu-west\"")
                .expect("valid")
                .as_str(),
            "eu-west"
        );
    }
}
