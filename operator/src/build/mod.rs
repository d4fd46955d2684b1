//! Desired objects as pure functions of a spec: no client, no clock. The
//! controllers apply what these return, and most of the operator's tests are
//! plain unit tests of them.

pub mod components;
pub mod geocluster;
pub mod regiongroup;

#[cfg(test)]
pub(crate) mod testing {
    use tern_crds::GeoCluster;

    /// examples/geocluster.yaml with the uid and namespace the API server
    /// would give it.
    pub fn example() -> GeoCluster {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/geocluster.yaml");
        let text = std::fs::read_to_string(path).expect("the example exists");
        let mut gc: GeoCluster = serde_yaml::from_str(&text).expect("the example parses");
        gc.metadata.uid = Some("0000-uid".into());
        gc
    }
}
