//! Checks the schema cannot express (or that depend on this operator's
//! flags). A GeoCluster that fails them is reported in status and an event,
//! and left alone until it changes.

use tern_crds::GeoCluster;

use crate::regions::RegionFilter;

/// Why the operator cannot act on `gc`, if it cannot.
pub fn geocluster(gc: &GeoCluster, managed: &RegionFilter) -> Result<(), String> {
    let total: i32 = gc.spec.directory.members.iter().map(|m| m.replicas).sum();
    if total % 2 == 0 {
        return Err(format!(
            "spec.directory.members: the directory group has {total} members in total; use an odd number so that a majority survives the loss of a minority"
        ));
    }
    if let Some(named) = managed.named() {
        let unknown: Vec<&str> = named
            .iter()
            .filter(|r| !gc.spec.regions.iter().any(|d| &d.name == *r))
            .map(String::as_str)
            .collect();
        if unknown.len() == named.len() {
            return Err(format!(
                "spec.regions: this operator manages regions {unknown:?} (--regions), and the GeoCluster declares none of them"
            ));
        }
    }
    Ok(())
}
