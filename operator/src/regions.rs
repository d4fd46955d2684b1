//! Which regions this operator manages (`--regions`). In a multi-cluster
//! deployment each cluster's operator manages its own region(s) and leaves the
//! rest of the same GeoCluster to the other clusters.

use std::collections::BTreeSet;

/// All regions, or the named ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionFilter(Option<BTreeSet<String>>);

impl RegionFilter {
    /// Manages every region of every GeoCluster.
    pub fn all() -> Self {
        Self(None)
    }

    /// Manages only `regions`; an empty list means all.
    pub fn only<I: IntoIterator<Item = S>, S: Into<String>>(regions: I) -> Self {
        let set: BTreeSet<String> = regions.into_iter().map(Into::into).collect();
        if set.is_empty() { Self(None) } else { Self(Some(set)) }
    }

    pub fn contains(&self, region: &str) -> bool {
        self.0.as_ref().is_none_or(|s| s.contains(region))
    }

    /// The named regions, when limited.
    pub fn named(&self) -> Option<&BTreeSet<String>> {
        self.0.as_ref()
    }
}
