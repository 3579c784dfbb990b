//! Parses and validates every kernel variant of the catalog with naga, the WGSL front end wgpu
//! uses: a WGSL error in any template or decoder fails here, on the host, before a device is
//! ever asked to compile it.

use mdi_shaders::{render, Variant};

#[test]
fn every_variant_parses_and_validates() {
    let mut failures = Vec::new();
    for variant in Variant::catalog() {
        let src = render(&variant);
        let module = match naga::front::wgsl::parse_str(&src) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!(
                    "{}: parse: {}",
                    variant.key(),
                    e.emit_to_string(&src)
                ));
                continue;
            }
        };
        // No optional capabilities: the kernels must run on adapters without shader-f16 or
        // subgroups (headless Chrome).
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        );
        match validator.validate(&module) {
            Ok(_) => {
                let entry = variant.entry_point();
                if !module.entry_points.iter().any(|e| e.name == entry) {
                    failures.push(format!("{}: no entry point {entry}", variant.key()));
                }
            }
            Err(e) => failures.push(format!(
                "{}: validate: {}",
                variant.key(),
                e.emit_to_string(&src)
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
