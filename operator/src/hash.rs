//! A hash that is the same in every operator replica and release (FNV-1a;
//! Rust's default hasher is seeded per process), for hashes written into
//! objects: the member configuration and the last applied state.

use std::hash::Hasher;

/// FNV-1a, 64 bits.
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// The hash of `bytes` as 16 hex digits.
pub fn hex(bytes: &[u8]) -> String {
    let mut h = Fnv::default();
    h.write(bytes);
    format!("{:016x}", h.finish())
}
