//! Prints both CRDs as YAML: `cargo run --bin crdgen > charts/sharedlb/crds/crds.yaml`.
fn main() {
    match sharedlb_crds::crds_yaml() {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!("crdgen: {e}");
            std::process::exit(1);
        }
    }
}
