//! The chart's CRD YAML must be exactly what the Rust types generate.

#[test]
fn committed_crds_match_the_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/sharedlb/crds/crds.yaml"
    );
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = sharedlb_crds::crds_yaml().expect("CRDs serialise");
    assert!(
        committed == generated,
        "charts/sharedlb/crds/crds.yaml is stale: run `cargo run --bin crdgen > charts/sharedlb/crds/crds.yaml`"
    );
}
