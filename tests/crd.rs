//! The CRD YAML in the repository is generated from the Rust types; this fails when it drifts.

#[test]
fn crd_files_match_the_rust_types() {
    let generated = philotes::crd::crd_yaml().unwrap();
    for path in [
        "crds/cdcpipeline.yaml",
        "charts/philotes/files/cdcpipeline.yaml",
    ] {
        let file = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            file == generated,
            "{path} is out of date with src/crd: regenerate it with `cargo run -- crd > {path}` (charts/philotes/templates/crd.yaml includes the chart copy)"
        );
    }
}

#[test]
fn crd_has_status_printer_columns_and_map_conditions() {
    let y = philotes::crd::crd_yaml().unwrap();
    for needle in [
        "shortNames:\n    - cdcp",
        "subresources:\n      status: {}",
        "name: Phase",
        "name: Lag",
        "name: Delivered",
        "name: Age",
        "x-kubernetes-list-type: map",
        "minItems: 1",
    ] {
        assert!(y.contains(needle), "CRD lacks {needle:?}");
    }
}
