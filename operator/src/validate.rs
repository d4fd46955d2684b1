//! Checks the schema cannot express (or that depend on this operator's
//! flags). A GeoCluster that fails them is reported in status and an event,
//! and left alone until it changes.

use tern_crds::GeoCluster;

use crate::regions::RegionFilter;

/// Why the operator cannot act on `gc`, if it cannot.
pub fn geocluster(gc: &GeoCluster, managed: &RegionFilter) -> Result<(), String> {
    // The schema refuses an even total too (CEL); this covers objects stored
    // before that rule existed.
    let total: i32 = gc.spec.directory.members.iter().map(|m| m.replicas).sum();
    if total % 2 == 0 {
        return Err(format!(
            "spec.directory.members: the directory group has {total} members in total; use an odd number so that a majority survives the loss of a minority"
        ));
    }
    for (i, region) in gc.spec.regions.iter().enumerate() {
        if let Some(bad) = region
            .node_selector
            .iter()
            .flatten()
            .map(|(k, _)| k)
            .find(|k| !is_label_key(k))
        {
            return Err(format!(
                "spec.regions[{i}].nodeSelector: `{bad}` is not a label key ([DNS-subdomain prefix/]name, the name at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
            ));
        }
    }
    if let Some(policy) = &gc.spec.network_policy {
        network_policy(policy, gc, managed)?;
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

/// spec.networkPolicy: label selectors the API server would refuse in a
/// NetworkPolicy, and a multi-cluster GeoCluster whose cross-region calls
/// the policies would refuse.
fn network_policy(
    policy: &tern_crds::NetworkPolicySpec,
    gc: &GeoCluster,
    managed: &RegionFilter,
) -> Result<(), String> {
    for (i, c) in policy.clients.iter().enumerate() {
        for (field, labels) in [
            ("namespaceSelector", &c.namespace_selector),
            ("podSelector", &c.pod_selector),
        ] {
            for (k, v) in labels.iter().flatten() {
                if !is_label_key(k) {
                    return Err(format!(
                        "spec.networkPolicy.clients[{i}].{field}: `{k}` is not a label key ([DNS-subdomain prefix/]name)"
                    ));
                }
                if !is_label_value(v) {
                    return Err(format!(
                        "spec.networkPolicy.clients[{i}].{field}: `{v}` is not a label value (at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
                    ));
                }
            }
        }
    }
    let elsewhere: Vec<&str> = gc
        .spec
        .regions
        .iter()
        .filter(|r| !managed.contains(&r.name))
        .map(|r| r.name.as_str())
        .collect();
    if policy.peer_cidrs.is_empty() && !elsewhere.is_empty() {
        return Err(format!(
            "spec.networkPolicy.peerCidrs is empty, but regions {elsewhere:?} run in other clusters: the policies would refuse their forwarded writes, mirrors and directory traffic; list those clusters' pod (or node) address ranges"
        ));
    }
    Ok(())
}

/// A Kubernetes label value: empty, or a label key's name part.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_label_name(value)
}

/// 1 to 63 letters, digits, `-`, `_` and `.`, starting and ending with a
/// letter or digit: a label key's name, and a non-empty label value.
fn is_label_name(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name.chars().all(|c| alnum(c) || "-_.".contains(c))
}

/// A Kubernetes label key: an optional DNS-subdomain prefix (at most 253
/// characters) and `/`, then a name of 1 to 63 characters. The CRD schema
/// cannot check map keys within the API server's CEL cost budget, so the
/// operator does, before any workload is applied with it.
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = is_label_name(name);
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    name_ok && prefix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys() {
        for ok in ["zone", "topology.kubernetes.io/region", "a_b.c-d", "x/y"] {
            assert!(is_label_key(ok), "{ok}");
        }
        for bad in [
            "",
            "bad key",
            "-x",
            "x-",
            "Topology.io/x",
            "a//b",
            "/x",
            "x/",
            &"k".repeat(64),
        ] {
            assert!(!is_label_key(bad), "{bad}");
        }
    }

    #[test]
    fn a_bad_node_selector_key_names_the_field() {
        let mut gc = crate::build::testing::example();
        gc.spec.regions[1].node_selector = Some([("bad key".to_string(), "x".to_string())].into());
        let err = geocluster(&gc, &RegionFilter::all()).expect_err("refused");
        assert!(err.starts_with("spec.regions[1].nodeSelector"), "{err}");
    }

    #[test]
    fn network_policies_need_the_other_clusters_ranges_and_valid_selectors() {
        let mut gc = crate::build::testing::example();
        gc.spec.network_policy = Some(tern_crds::NetworkPolicySpec::default());
        // One cluster runs every region: nothing comes from elsewhere.
        geocluster(&gc, &RegionFilter::all()).expect("one cluster");
        let err = geocluster(&gc, &RegionFilter::only(["eu-west"])).expect_err("refused");
        assert!(
            err.starts_with("spec.networkPolicy.peerCidrs is empty") && err.contains("us-east"),
            "{err}"
        );
        let mut policy = tern_crds::NetworkPolicySpec {
            peer_cidrs: vec!["10.245.0.0/16".into()],
            ..Default::default()
        };
        gc.spec.network_policy = Some(policy.clone());
        geocluster(&gc, &RegionFilter::only(["eu-west"])).expect("ranges given");
        policy.clients = vec![tern_crds::NetworkPeer {
            pod_selector: Some([("app".to_string(), "-bad".to_string())].into()),
            ..Default::default()
        }];
        gc.spec.network_policy = Some(policy);
        let err = geocluster(&gc, &RegionFilter::all()).expect_err("refused");
        assert!(
            err.starts_with("spec.networkPolicy.clients[0].podSelector: `-bad`"),
            "{err}"
        );
    }

    #[test]
    fn label_values() {
        for ok in ["", "payments", "a.b_c-d", &"v".repeat(63)] {
            assert!(is_label_value(ok), "{ok}");
        }
        for bad in ["-x", "x-", "a b", "a/b", &"v".repeat(64)] {
            assert!(!is_label_value(bad), "{bad}");
        }
    }
}
